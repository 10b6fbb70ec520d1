//! GGUF's K-quant super-blocks as Kiln's 32-value blocks ([`QuantType::Q4K`],
//! [`QuantType::Q6K`]), the same values exactly, so the 32-value kernels read them.
//!
//! - **Q4_K** (`block_q4_K`, 144 bytes per 256 values): f16 `d`, f16 `dmin`, 12 bytes
//!   packing eight 6-bit scales `sc` and minima `m`, 128 bytes of nibbles (64-value
//!   chunk `i`: sub-block `2i` in the low nibbles of 32 bytes, `2i + 1` in the high).
//!   Sub-block `j`'s value is `(d sc_j) q - dmin m_j`; its Kiln block holds `s = d sc_j`
//!   and `m = -(dmin m_j)` as f32 (an f16 times a 6-bit integer: exact) and the nibbles
//!   in Q4_1's order, 24 bytes.
//! - **Q6_K** (`block_q6_K`, 210 bytes per 256 values): 128 bytes of low nibbles `ql`,
//!   64 bytes of high bit pairs `qh`, sixteen i8 scales (one per 16 values), f16 `d`.
//!   Value `i` is `(d sc_{i / 16}) (q_i - 32)`; its Kiln block holds `d`, the scales of
//!   its two halves and the 32 values `q - 32` as i8, 36 bytes.
//!
//! The arithmetic is gguf-py's `gguf.quants.dequantize` (the scale product first, in
//! f32), so [`super::dequantize`] of the Kiln blocks gives the bits that dequantizing
//! the GGUF ones gives (tests/kquant.rs checks it against Kiln's GGUF reader).

use super::{BLOCK, QuantType, f16_at};

/// Values per super-block (ggml's `QK_K`).
pub const SUPER: usize = 256;

/// Why GGUF blocks cannot be rewritten.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{ty}: {found} bytes are not whole {block}-byte GGUF blocks")]
pub struct LengthError {
    pub ty: &'static str,
    pub found: usize,
    pub block: usize,
}

/// Append GGUF's blocks of `ty` (`src`) to `out` as Kiln's: a copy for the formats whose
/// blocks are GGUF's own, the rewrite above for Q4_K and Q6_K.
pub fn from_gguf(ty: QuantType, src: &[u8], out: &mut Vec<u8>) -> Result<(), LengthError> {
    let block = ty.ggml().type_size();
    if !src.len().is_multiple_of(block) {
        return Err(LengthError {
            ty: ty.name(),
            found: src.len(),
            block,
        });
    }
    match ty {
        QuantType::Q4K => src.chunks_exact(block).for_each(|sb| q4_k(sb, out)),
        QuantType::Q6K => src.chunks_exact(block).for_each(|sb| q6_k(sb, out)),
        _ => out.extend_from_slice(src),
    }
    Ok(())
}

/// Sub-block `j`'s 6-bit scale and minimum from the 12 packed bytes (`get_scale_min_k4`).
fn scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

fn q4_k(sb: &[u8], out: &mut Vec<u8>) {
    let (d, dmin) = (f16_at(sb, 0), f16_at(sb, 2));
    let (scales, qs) = (&sb[4..16], &sb[16..144]);
    for j in 0..SUPER / BLOCK {
        let (sc, m) = scale_min(j, scales);
        out.extend_from_slice(&(d * sc as f32).to_le_bytes());
        out.extend_from_slice(&(-(dmin * m as f32)).to_le_bytes());
        // Sub-block j: the low (even j) or high (odd j) nibbles of 32 bytes.
        let bytes = &qs[(j / 2) * 32..(j / 2 + 1) * 32];
        let value = |i: usize| if j % 2 == 0 { bytes[i] & 0x0f } else { bytes[i] >> 4 };
        out.extend((0..16).map(|i| value(i) | (value(i + 16) << 4)));
    }
}

fn q6_k(sb: &[u8], out: &mut Vec<u8>) {
    let (ql, qh, scales, d) = (&sb[..128], &sb[128..192], &sb[192..208], &sb[208..210]);
    // ggml's order: two halves of 128 values; in each, value l + 32 t (t = 0..4) takes
    // the low (t < 2) or high nibble of ql[l + 32 (t % 2)] and bits 2t..2t+2 of qh[l].
    let mut q = [0i8; SUPER];
    for half in 0..2 {
        let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
        for l in 0..32 {
            for t in 0..4 {
                let byte = ql[l + 32 * (t % 2)];
                let low = if t < 2 { byte & 0x0f } else { byte >> 4 };
                let high = (qh[l] >> (2 * t)) & 3;
                q[128 * half + 32 * t + l] = (low | (high << 4)) as i8 - 32;
            }
        }
    }
    for (j, values) in q.chunks_exact(BLOCK).enumerate() {
        out.extend_from_slice(d);
        out.extend_from_slice(&[scales[2 * j], scales[2 * j + 1]]);
        out.extend(values.iter().map(|&v| v as u8));
    }
}
