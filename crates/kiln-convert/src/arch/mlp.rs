//! MLP: a `torch.save`d PyTorch `nn.Sequential`-style classifier (no Hugging Face config).

use super::{Conversion, Rules};

pub const CONVERSION: Conversion = Conversion {
    arch: "mlp",
    rules: Rules {
        renames: &[],
        ignore: &[],
        transpose: &[r"\.weight$"],
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
