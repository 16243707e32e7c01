//! File types and the per-tensor type policy of llama.cpp's quantizer, and the
//! conversion of one f32 tensor to a GGML type's bytes.
//!
//! A file type (`--quant q4_k_m`) does not give every tensor the same type: like
//! `llama-quantize`, the output head gets more bits, `attn_v` and `ffn_down` of some
//! layers get more bits under the `_m` types, 1-D tensors (norms, biases, rope factors)
//! stay f32, and a row whose length is not a multiple of the k-quants' 256-value block
//! (SmolLM2's 576, Qwen2-0.5B's 896) falls back to the legacy type of the same size
//! class (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0).

use anyhow::{Result, bail};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::fmt;
use std::str::FromStr;

/// What an exported GGUF is stored as: llama.cpp's file types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Quant {
    /// Every tensor f32 (exact; 4 bytes per weight).
    F32,
    /// Matrices f16, 1-D tensors f32 (llama.cpp's converter default).
    F16,
    /// Matrices bf16.
    BF16,
    /// 8.5 bits per weight, nearly lossless.
    Q8_0,
    /// 4.5 bits per weight, legacy.
    Q4_0,
    /// 5 bits per weight, legacy.
    Q4_1,
    /// 5.5 bits per weight, legacy.
    Q5_0,
    /// 6 bits per weight, legacy.
    Q5_1,
    /// 4-bit k-quants with 6-bit `attn_v` / `ffn_down` in some layers and a 6-bit head
    /// (about 4.9 bits per weight): the usual choice.
    Q4KM,
    /// 5-bit k-quants, medium.
    Q5KM,
    /// 6-bit k-quants.
    Q6K,
    /// Each tensor keeps the type it has in the source GGUF; tensors whose values
    /// are unchanged are copied byte for byte, changed ones (a merged adapter) are
    /// quantized again to their type. For a non-GGUF source: f16.
    Source,
}

impl Quant {
    /// Every name [`FromStr`] accepts.
    pub const NAMES: &'static [&'static str] =
        &["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k", "source"];

    /// llama.cpp's `general.file_type` (`LlamaFileType`).
    pub fn file_type(self) -> u32 {
        match self {
            Quant::F32 => 0,
            Quant::F16 | Quant::Source => 1,
            Quant::Q4_0 => 2,
            Quant::Q4_1 => 3,
            Quant::Q8_0 => 7,
            Quant::Q5_0 => 8,
            Quant::Q5_1 => 9,
            Quant::Q4KM => 15,
            Quant::Q5KM => 17,
            Quant::Q6K => 18,
            Quant::BF16 => 32,
        }
    }

    /// The type most matrices get.
    pub fn base_type(self) -> GgmlDType {
        match self {
            Quant::F32 => GgmlDType::F32,
            Quant::F16 | Quant::Source => GgmlDType::F16,
            Quant::BF16 => GgmlDType::BF16,
            Quant::Q8_0 => GgmlDType::Q8_0,
            Quant::Q4_0 => GgmlDType::Q4_0,
            Quant::Q4_1 => GgmlDType::Q4_1,
            Quant::Q5_0 => GgmlDType::Q5_0,
            Quant::Q5_1 => GgmlDType::Q5_1,
            Quant::Q4KM => GgmlDType::Q4K,
            Quant::Q5KM => GgmlDType::Q5K,
            Quant::Q6K => GgmlDType::Q6K,
        }
    }

    fn is_quantized(self) -> bool {
        !matches!(self, Quant::F32 | Quant::F16 | Quant::BF16 | Quant::Source)
    }
}

impl fmt::Display for Quant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Quant::F32 => "f32",
            Quant::F16 => "f16",
            Quant::BF16 => "bf16",
            Quant::Q8_0 => "q8_0",
            Quant::Q4_0 => "q4_0",
            Quant::Q4_1 => "q4_1",
            Quant::Q5_0 => "q5_0",
            Quant::Q5_1 => "q5_1",
            Quant::Q4KM => "q4_k_m",
            Quant::Q5KM => "q5_k_m",
            Quant::Q6K => "q6_k",
            Quant::Source => "source",
        })
    }
}

impl FromStr for Quant {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "f32" => Quant::F32,
            "f16" => Quant::F16,
            "bf16" => Quant::BF16,
            "q8_0" => Quant::Q8_0,
            "q4_0" => Quant::Q4_0,
            "q4_1" => Quant::Q4_1,
            "q5_0" => Quant::Q5_0,
            "q5_1" => Quant::Q5_1,
            "q4_k_m" | "q4_k" => Quant::Q4KM,
            "q5_k_m" | "q5_k" => Quant::Q5KM,
            "q6_k" => Quant::Q6K,
            "source" | "keep" => Quant::Source,
            other => bail!("unknown quantization `{other}`: expected one of {}", Quant::NAMES.join(", ")),
        })
    }
}

/// Where a tensor sits in the model, for the per-tensor policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A 1-D tensor (norm, bias, rope factors): always f32.
    Vector,
    /// The token embedding (`token_embd.weight`).
    Embedding,
    /// The output head, or the token embedding when the head is tied to it.
    Output,
    /// `blk.N.attn_v.weight`.
    AttnV { layer: usize },
    /// `blk.N.ffn_down.weight`.
    FfnDown { layer: usize },
    /// Any other matrix.
    Matrix,
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every
/// third layer in between.
pub fn use_more_bits(layer: usize, layers: usize) -> bool {
    layer < layers / 8 || layer >= 7 * layers / 8 || (layer >= layers / 8 && (layer - layers / 8) % 3 == 2)
}

/// The type a tensor gets under `quant`, given its role, row length and the model's
/// layer count, as `llama-quantize` chooses it.
pub fn tensor_type(quant: Quant, role: Role, row_len: usize, layers: usize) -> GgmlDType {
    if role == Role::Vector || quant == Quant::F32 {
        return GgmlDType::F32;
    }
    let base = quant.base_type();
    let mut t = match (quant, role) {
        (q, Role::Output) if q.is_quantized() => {
            if row_len % 256 != 0 || base == GgmlDType::Q8_0 {
                GgmlDType::Q8_0
            } else {
                GgmlDType::Q6K
            }
        }
        (Quant::Q4KM | Quant::Q5KM, Role::AttnV { layer } | Role::FfnDown { layer }) if use_more_bits(layer, layers) => GgmlDType::Q6K,
        _ => base,
    };
    if t.block_size() == 256 && row_len % 256 != 0 {
        t = match t {
            GgmlDType::Q4K => GgmlDType::Q5_0,
            GgmlDType::Q5K => GgmlDType::Q5_1,
            _ => GgmlDType::Q8_0,
        };
    }
    if row_len % t.block_size() != 0 {
        // Legacy blocks are 32 wide: a row that is not a multiple stays f16.
        t = GgmlDType::F16;
    }
    t
}

/// The bytes of `values` (row-major, `shape`) stored as `dtype`, as llama.cpp and the
/// `gguf` Python package write them.
pub fn quantize(values: &[f32], shape: &[usize], dtype: GgmlDType) -> Result<Vec<u8>> {
    Ok(match dtype {
        GgmlDType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlDType::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        GgmlDType::BF16 => values.iter().flat_map(|v| bf16_bits(*v).to_le_bytes()).collect(),
        GgmlDType::Q8_1 | GgmlDType::Q8K => bail!("{dtype:?} is an activation type, not written as a weight"),
        // ggml's reference search, not candle's older one (see `kquants`).
        GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K if values.len() % super::kquants::QK_K != 0 => {
            bail!("{dtype:?}: {} values are not whole blocks of {}", values.len(), super::kquants::QK_K)
        }
        GgmlDType::Q4K => super::kquants::quantize_q4_k(values),
        GgmlDType::Q5K => super::kquants::quantize_q5_k(values),
        GgmlDType::Q6K => super::kquants::quantize_q6_k(values),
        _ => {
            // Blocks never cross a row, so rows quantize in chunks of about 1 MB: the same
            // bytes without a second full-size copy of a large tensor (the embedding).
            let row = *shape.last().unwrap_or(&1);
            if row == 0 || values.len() % row != 0 {
                bail!("{} values are not whole rows of {row}", values.len());
            }
            let rows_per_chunk = ((1 << 18) / row).max(1);
            let mut out = Vec::with_capacity(values.len() / dtype.block_size() * dtype.type_size());
            for chunk in values.chunks(rows_per_chunk * row) {
                let t = Tensor::from_slice(chunk, (chunk.len() / row, row), &Device::Cpu)?;
                out.extend_from_slice(&QTensor::quantize(&t, dtype)?.data()?);
            }
            out
        }
    })
}

/// f32 → bf16 rounding to nearest even, NaNs kept quiet (gguf's `__compute_fp32_to_bf16`).
fn bf16_bits(v: f32) -> u16 {
    let n = v.to_bits();
    let n = if n & 0x7fff_ffff > 0x7f80_0000 { (n & 0xffff_0000) | (64 << 16) } else { n };
    (n.wrapping_add(0x7fff + ((n >> 16) & 1)) >> 16) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_m_gives_the_head_and_every_third_middle_layer_more_bits() {
        let more: Vec<usize> = (0..30).filter(|&l| use_more_bits(l, 30)).collect();
        // 30 layers: the first 3, the last 4 (from 26), and layers 3 + 3k + 2 between.
        assert_eq!(more, vec![0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]);
        assert_eq!(tensor_type(Quant::Q4KM, Role::Output, 4096, 32), GgmlDType::Q6K);
        assert_eq!(tensor_type(Quant::Q4KM, Role::AttnV { layer: 0 }, 4096, 32), GgmlDType::Q6K);
        assert_eq!(tensor_type(Quant::Q4KM, Role::AttnV { layer: 4 }, 4096, 32), GgmlDType::Q4K);
        assert_eq!(tensor_type(Quant::Q4KM, Role::Matrix, 4096, 32), GgmlDType::Q4K);
        assert_eq!(tensor_type(Quant::Q4KM, Role::Vector, 4096, 32), GgmlDType::F32);
        assert_eq!(tensor_type(Quant::Q8_0, Role::Output, 4096, 32), GgmlDType::Q8_0);
        assert_eq!(tensor_type(Quant::F16, Role::Output, 4096, 32), GgmlDType::F16);
    }

    #[test]
    fn rows_that_are_not_whole_k_quant_blocks_fall_back_like_llama_quantize() {
        // SmolLM2-135M: hidden 576 = 2.25 blocks of 256.
        assert_eq!(tensor_type(Quant::Q4KM, Role::Matrix, 576, 30), GgmlDType::Q5_0);
        assert_eq!(tensor_type(Quant::Q5KM, Role::Matrix, 576, 30), GgmlDType::Q5_1);
        assert_eq!(tensor_type(Quant::Q6K, Role::Matrix, 576, 30), GgmlDType::Q8_0);
        assert_eq!(tensor_type(Quant::Q4KM, Role::FfnDown { layer: 0 }, 1536, 30), GgmlDType::Q6K);
        assert_eq!(tensor_type(Quant::Q4KM, Role::Output, 576, 30), GgmlDType::Q8_0);
        assert_eq!(tensor_type(Quant::Q4_0, Role::Matrix, 100, 30), GgmlDType::F16);
    }

    #[test]
    fn names_round_trip_and_unknown_names_list_the_known_ones() {
        for n in Quant::NAMES {
            assert_eq!(n.parse::<Quant>().unwrap().to_string(), *n);
        }
        let e = "q3_k".parse::<Quant>().unwrap_err().to_string();
        assert!(e.contains("q4_k_m") && e.contains("q3_k"), "{e}");
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert!(half::bf16::from_bits(bf16_bits(f32::NAN)).is_nan());
    }
}
