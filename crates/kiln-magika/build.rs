//! Generate the Burn model (Rust source + .bpk weights) from Magika's ONNX file.
fn main() {
    println!("cargo:rerun-if-changed=model/magika_standard_v3_3.onnx");
    burn_onnx::ModelGen::new()
        .input("model/magika_standard_v3_3.onnx")
        .out_dir("model/")
        .run_from_script();
}
