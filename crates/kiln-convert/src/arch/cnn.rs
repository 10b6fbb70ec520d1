//! CNN: a PyTorch classifier of two conv stages and two linear layers (no Hugging Face config).

use super::{Conversion, Rules};

pub const CONVERSION: Conversion = Conversion {
    arch: "cnn",
    rules: Rules {
        renames: &[],
        ignore: &[],
        transpose: &[r"^fc\d\.weight$"],
        export: &[],
        tied: &[],
    },
    model_types: &[],
    from_hf: None,
    to_hf: None,
    gguf: None,
    onnx: None,
    head: None,
};
