//! Weight-name rule tables, one per architecture: how a Hugging Face / PyTorch
//! parameter name becomes a Kiln one, which source tensors are buffers to ignore, and
//! which weights are stored `[out, in]` (PyTorch `nn.Linear`) and must be transposed to
//! Burn's `[in, out]`. GPT-2's `Conv1D` already stores `[in, out]`: it gets no transpose
//! (a blanket Linear transpose would silently corrupt the square `c_proj`).

use kiln_models::ModelConfig;

/// The conversion table of one architecture.
pub struct Rules {
    /// `(regex, replacement)` applied in order to every source name.
    pub renames: &'static [(&'static str, &'static str)],
    /// Source names (regex, before renaming) that are buffers or duplicates, not weights.
    pub ignore: &'static [&'static str],
    /// Kiln names (regex) whose source is `[out, in]` and is transposed.
    pub transpose: &'static [&'static str],
    /// `(regex, replacement)` from Kiln names back to Hugging Face ones (`--to hf`).
    pub export: &'static [(&'static str, &'static str)],
}

const GPT2: Rules = Rules {
    renames: &[
        // GPT2Model checkpoints have no `transformer.` prefix; GPT2LMHeadModel ones do.
        (r"^(h|wte|wpe|ln_f)\.", "transformer.$1."),
        (r"\.(ln_1|ln_2|ln_f)\.weight$", ".$1.gamma"),
        (r"\.(ln_1|ln_2|ln_f)\.bias$", ".$1.beta"),
    ],
    ignore: &[
        r"\.attn\.(bias|masked_bias)$", // causal-mask buffers
        r"^lm_head\.weight$",           // tied to transformer.wte.weight
    ],
    transpose: &[],
    export: &[(r"\.gamma$", ".weight"), (r"\.beta$", ".bias")],
};

const LLAMA: Rules = Rules {
    renames: &[(
        r"\.(input_layernorm|post_attention_layernorm|norm)\.weight$",
        ".$1.gamma",
    )],
    ignore: &[r"\.rotary_emb\.inv_freq$"],
    transpose: &[r"_proj\.weight$", r"^lm_head\.weight$"],
    export: &[(r"\.gamma$", ".weight")],
};

const BERT: Rules = Rules {
    renames: &[
        (r"^bert\.", ""),
        (r"\.LayerNorm\.weight$", ".layer_norm.gamma"),
        (r"\.LayerNorm\.bias$", ".layer_norm.beta"),
        (r"\.attention\.self\.", ".attention.self_attn."),
    ],
    ignore: &[r"^embeddings\.position_ids$", r"^cls\."],
    transpose: &[r"\.(query|key|value|dense)\.weight$"],
    export: &[
        (r"\.layer_norm\.gamma$", ".LayerNorm.weight"),
        (r"\.layer_norm\.beta$", ".LayerNorm.bias"),
        (r"\.attention\.self_attn\.", ".attention.self."),
    ],
};

const MLP: Rules = Rules {
    renames: &[],
    ignore: &[],
    transpose: &[r"\.weight$"],
    export: &[],
};

const CNN: Rules = Rules {
    renames: &[],
    ignore: &[],
    transpose: &[r"^fc\d\.weight$"],
    export: &[],
};

/// The table for `model`'s architecture.
pub fn rules_for(model: &ModelConfig) -> &'static Rules {
    match model {
        ModelConfig::Gpt2(_) => &GPT2,
        ModelConfig::Llama(_) => &LLAMA,
        ModelConfig::Bert(_) => &BERT,
        ModelConfig::Mlp(_) => &MLP,
        ModelConfig::Cnn(_) => &CNN,
    }
}
