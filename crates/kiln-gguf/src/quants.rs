//! GGML tensor types and their dequantisers, block by block.
//!
//! Each dequantiser reproduces the arithmetic of llama.cpp's reference (its Python
//! package `gguf`, `gguf.quants.dequantize`) operation for operation in f32, so the
//! results are bit-identical (tests/gguf.rs checks every type against it). Block
//! layouts (`QK_K` = 256 values per super-block):
//!
//! | type | values | bytes | layout |
//! |------|-------:|------:|--------|
//! | Q4_0 | 32 | 18 | f16 d, 16 B nibbles: `d * (q - 8)` |
//! | Q4_1 | 32 | 20 | f16 d, f16 m, 16 B nibbles: `d * q + m` |
//! | Q5_0 | 32 | 22 | f16 d, u32 high bits, 16 B nibbles: `d * (q - 16)` |
//! | Q5_1 | 32 | 24 | f16 d, f16 m, u32 high bits, 16 B nibbles: `d * q + m` |
//! | Q8_0 | 32 | 34 | f16 d, 32 i8: `q * d` |
//! | Q2_K | 256 | 84 | 16 B 4-bit scale/min pairs, 64 B 2-bit q, f16 d, f16 dmin |
//! | Q3_K | 256 | 110 | 32 B high-bit mask, 64 B 2-bit q, 12 B 6-bit scales, f16 d |
//! | Q4_K | 256 | 144 | f16 d, f16 dmin, 12 B 6-bit scales/mins, 128 B nibbles |
//! | Q5_K | 256 | 176 | f16 d, f16 dmin, 12 B scales/mins, 32 B high bits, 128 B nibbles |
//! | Q6_K | 256 | 210 | 128 B low nibbles, 64 B 2-bit highs, 16 i8 scales, f16 d |

use half::f16;

/// The GGML tensor types Kiln reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
}

/// `QK_K`: values per K-quant super-block.
pub const QK_K: usize = 256;

impl GgmlType {
    pub const ALL: [GgmlType; 13] = [
        Self::F32,
        Self::F16,
        Self::BF16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q2_K,
        Self::Q3_K,
        Self::Q4_K,
        Self::Q5_K,
        Self::Q6_K,
    ];

    /// The type with GGML id `id` (`ggml_type` in ggml.h); `Err` carries the type's name
    /// when it is one Kiln does not read.
    pub fn from_id(id: u32) -> Result<Self, String> {
        Ok(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2_K,
            11 => Self::Q3_K,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            30 => Self::BF16,
            other => {
                let name = match other {
                    9 => "Q8_1",
                    15 => "Q8_K",
                    16 => "IQ2_XXS",
                    17 => "IQ2_XS",
                    18 => "IQ3_XXS",
                    19 => "IQ1_S",
                    20 => "IQ4_NL",
                    21 => "IQ3_S",
                    22 => "IQ2_S",
                    23 => "IQ4_XS",
                    24 => "I8",
                    25 => "I16",
                    26 => "I32",
                    27 => "I64",
                    28 => "F64",
                    29 => "IQ1_M",
                    34 => "TQ1_0",
                    35 => "TQ2_0",
                    39 => "MXFP4",
                    _ => return Err(format!("unknown tensor type {other}")),
                };
                return Err(format!("tensor type {name} (id {other})"));
            }
        })
    }

    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q2_K => 10,
            Self::Q3_K => 11,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
            Self::BF16 => 30,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q2_K => "Q2_K",
            Self::Q3_K => "Q3_K",
            Self::Q4_K => "Q4_K",
            Self::Q5_K => "Q5_K",
            Self::Q6_K => "Q6_K",
        }
    }

    /// Values per block.
    pub fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 => 32,
            Self::Q2_K | Self::Q3_K | Self::Q4_K | Self::Q5_K | Self::Q6_K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q2_K => 84,
            Self::Q3_K => 110,
            Self::Q4_K => 144,
            Self::Q5_K => 176,
            Self::Q6_K => 210,
        }
    }

    /// Bytes of `n` values (`n` a multiple of the block size).
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        (n / self.block_size()).checked_mul(self.type_size())
    }
}

fn half(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Dequantise `data` (whole blocks of `ty`) into `out` (`out.len()` values).
///
/// # Panics
/// When `data` is not exactly the bytes of `out.len()` values; the reader checks this
/// before calling.
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) {
    let (bs, ts) = (ty.block_size(), ty.type_size());
    assert!(
        out.len().is_multiple_of(bs) && data.len() == out.len() / bs * ts,
        "dequantize {}: {} bytes for {} values",
        ty.name(),
        data.len(),
        out.len()
    );
    let blocks = data.chunks_exact(ts).zip(out.chunks_exact_mut(bs));
    match ty {
        GgmlType::F32 => blocks.for_each(|(b, o)| o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        GgmlType::F16 => blocks.for_each(|(b, o)| o[0] = half(b, 0)),
        GgmlType::BF16 => {
            blocks.for_each(|(b, o)| o[0] = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
        }
        GgmlType::Q4_0 => blocks.for_each(|(b, o)| q4_0(b, o)),
        GgmlType::Q4_1 => blocks.for_each(|(b, o)| q4_1(b, o)),
        GgmlType::Q5_0 => blocks.for_each(|(b, o)| q5_0(b, o)),
        GgmlType::Q5_1 => blocks.for_each(|(b, o)| q5_1(b, o)),
        GgmlType::Q8_0 => blocks.for_each(|(b, o)| q8_0(b, o)),
        GgmlType::Q2_K => blocks.for_each(|(b, o)| q2_k(b, o)),
        GgmlType::Q3_K => blocks.for_each(|(b, o)| q3_k(b, o)),
        GgmlType::Q4_K => blocks.for_each(|(b, o)| q4_k(b, o)),
        GgmlType::Q5_K => blocks.for_each(|(b, o)| q5_k(b, o)),
        GgmlType::Q6_K => blocks.for_each(|(b, o)| q6_k(b, o)),
    }
}

/// Low nibbles of `qs[0..16]` are values 0..16, high nibbles values 16..32.
fn nibble(qs: &[u8], j: usize) -> u8 {
    (qs[j % 16] >> (4 * (j / 16))) & 0x0F
}

fn q4_0(b: &[u8], out: &mut [f32]) {
    let d = half(b, 0);
    for (j, o) in out.iter_mut().enumerate() {
        *o = d * (nibble(&b[2..], j) as i8 - 8) as f32;
    }
}

fn q4_1(b: &[u8], out: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    for (j, o) in out.iter_mut().enumerate() {
        *o = d * nibble(&b[4..], j) as f32 + m;
    }
}

/// The 5-bit value `j` of a Q5 block: a nibble plus bit `j` of the little-endian `qh`.
fn five_bit(qh: &[u8], qs: &[u8], j: usize) -> u8 {
    let high = (u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]) >> j) & 1;
    nibble(qs, j) | ((high as u8) << 4)
}

fn q5_0(b: &[u8], out: &mut [f32]) {
    let d = half(b, 0);
    for (j, o) in out.iter_mut().enumerate() {
        *o = d * (five_bit(&b[2..6], &b[6..], j) as i8 - 16) as f32;
    }
}

fn q5_1(b: &[u8], out: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    for (j, o) in out.iter_mut().enumerate() {
        *o = d * five_bit(&b[4..8], &b[8..], j) as f32 + m;
    }
}

fn q8_0(b: &[u8], out: &mut [f32]) {
    let d = half(b, 0);
    for (j, o) in out.iter_mut().enumerate() {
        *o = (b[2 + j] as i8) as f32 * d;
    }
}

fn q2_k(b: &[u8], out: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (half(b, 80), half(b, 82));
    for (p, o) in out.iter_mut().enumerate() {
        // value p: half h of 128, 2-bit plane j, lane l
        let (h, j, l) = (p / 128, p % 128 / 32, p % 32);
        let q = (qs[h * 32 + l] >> (2 * j)) & 3;
        let s = scales[p / 16];
        let dl = d * (s & 0x0F) as f32;
        let ml = dmin * (s >> 4) as f32;
        *o = dl * q as f32 - ml;
    }
}

fn q3_k(b: &[u8], out: &mut [f32]) {
    let (hmask, qs, scales) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = half(b, 108);
    for (p, o) in out.iter_mut().enumerate() {
        let (h, j, l) = (p / 128, p % 128 / 32, p % 32);
        let low = (qs[h * 32 + l] >> (2 * j)) & 3;
        let high = (hmask[l] >> (p / 32)) & 1;
        // the offset 4 applies when the mask bit is clear
        let q = low as i8 - (((high ^ 1) << 2) as i8);
        let s = p / 16;
        let sc_low = (scales[s % 8] >> (4 * (s / 8))) & 0x0F;
        let sc_high = (scales[8 + s % 4] >> (2 * (s / 4))) & 0x03;
        let sc = (sc_low | (sc_high << 4)) as i8 - 32;
        let dl = d * sc as f32;
        *o = dl * q as f32;
    }
}

/// The 6-bit scale and min of sub-block `j` (of 8) of a Q4_K / Q5_K block.
fn scale_min_k4(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 0x3F, scales[j + 4] & 0x3F)
    } else {
        let i = j - 4;
        (
            (scales[8 + i] & 0x0F) | ((scales[i] >> 2) & 0x30),
            (scales[8 + i] >> 4) | ((scales[4 + i] >> 2) & 0x30),
        )
    }
}

fn q4_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for (j, sub) in out.chunks_exact_mut(32).enumerate() {
        let (sc, m) = scale_min_k4(scales, j);
        let (dl, ml) = (d * sc as f32, dmin * m as f32);
        for (l, o) in sub.iter_mut().enumerate() {
            let q = (qs[j / 2 * 32 + l] >> (4 * (j % 2))) & 0x0F;
            *o = dl * q as f32 - ml;
        }
    }
}

fn q5_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for (j, sub) in out.chunks_exact_mut(32).enumerate() {
        let (sc, m) = scale_min_k4(scales, j);
        let (dl, ml) = (d * sc as f32, dmin * m as f32);
        for (l, o) in sub.iter_mut().enumerate() {
            let low = (qs[j / 2 * 32 + l] >> (4 * (j % 2))) & 0x0F;
            let high = (qh[l] >> j) & 1;
            *o = dl * (low | (high << 4)) as f32 - ml;
        }
    }
}

fn q6_k(b: &[u8], out: &mut [f32]) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = half(b, 208);
    for (p, o) in out.iter_mut().enumerate() {
        let (h, r) = (p / 128, p % 128);
        let low = (ql[h * 64 + r % 64] >> (4 * (r / 64))) & 0x0F;
        let high = (qh[h * 32 + r % 32] >> (2 * (r / 32))) & 0x03;
        let q = (low | (high << 4)) as i8 - 32;
        let dl = d * (scales[p / 16] as i8) as f32;
        *o = dl * q as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_sizes_match_ggml() {
        for ty in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(ty.id()).unwrap(), ty);
        }
        assert_eq!(GgmlType::Q4_K.bytes_for(512), Some(288));
        let err = GgmlType::from_id(16).unwrap_err();
        assert!(err.contains("IQ2_XXS"), "{err}");
        assert!(GgmlType::from_id(999).unwrap_err().contains("999"));
    }

    #[test]
    fn q8_0_and_q4_0_by_hand() {
        // d = 0.5 (f16 0x3800), values -3, 0, 127, ...
        let mut block = vec![0x00, 0x38];
        block.extend((0..32).map(|i| (i as i8 - 3) as u8));
        let mut out = [0.0; 32];
        dequantize(GgmlType::Q8_0, &block, &mut out);
        assert_eq!(out[0], -1.5);
        assert_eq!(out[31], 14.0);
        // Q4_0: nibble 0 -> -8 * d; byte 0x9F: low nibble 15 -> value 0, high 9 -> value 16
        let mut block = vec![0x00, 0x38, 0x9F];
        block.extend([0x88; 15]);
        let mut out = [0.0; 32];
        dequantize(GgmlType::Q4_0, &block, &mut out);
        assert_eq!(out[0], 3.5);
        assert_eq!(out[16], 0.5);
        assert_eq!(out[1], 0.0);
    }
}
