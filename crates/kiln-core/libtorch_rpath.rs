//! Build script shared by the packages whose binaries and tests may link libtorch
//! (`build = "../kiln-core/libtorch_rpath.rs"`; kiln-core itself has no build script): with the `tch` feature, bake
//! `$LIBTORCH/lib` into their rpath, so that they run without LD_LIBRARY_PATH.
//! (torch-sys passes the path to its own C++ code only, not to the final link.)

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if std::env::var_os("CARGO_FEATURE_TCH").is_none() {
        return;
    }
    if let Some(libtorch) = std::env::var_os("LIBTORCH") {
        let lib = std::path::Path::new(&libtorch).join("lib");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
