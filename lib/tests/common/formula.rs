//! The weight formula of the transformers reference scripts
//! (`lib/tests/data/make_config_reference.py`, `make_export_reference.py`): every
//! tensor is a function of its name, so models written by transformers can be
//! rebuilt bit for bit without committing a weight file.

/// FNV-1a 64 of the name's UTF-8 bytes.
pub fn fnv1a64(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// The formula's `n` values for the tensor `name`, in f64: a splitmix64 stream seeded
/// by the name's hash, mapped to 1 ± 0.1 for norm weights and ± 0.2 otherwise.
pub fn weights(name: &str, n: usize) -> Vec<f64> {
    let mut state = fnv1a64(name);
    let norm = name.ends_with("norm.weight");
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 11) as f64 / (1u64 << 53) as f64;
            if norm { 1.0 + (2.0 * u - 1.0) * 0.1 } else { (2.0 * u - 1.0) * 0.2 }
        })
        .collect()
}

/// Writes the safetensors files a reference recorded (`[{"file", "tensors": [{"name",
/// "dtype", "shape"}]}]`, as transformers saved them) into `dir`, every tensor filled by
/// the formula and stored as `float32` or `bfloat16` like the original.
pub fn write_safetensors(files: &serde_json::Value, dir: &std::path::Path) -> anyhow::Result<()> {
    use candle_core::{DType, Device, Tensor};
    for file in files.as_array().ok_or_else(|| anyhow::anyhow!("the reference's safetensors list is not an array"))? {
        let mut tensors = std::collections::HashMap::new();
        for t in file["tensors"].as_array().ok_or_else(|| anyhow::anyhow!("{file}: no tensors array"))? {
            let name = t["name"].as_str().ok_or_else(|| anyhow::anyhow!("{t}: no name"))?;
            let shape: Vec<usize> = serde_json::from_value(t["shape"].clone())?;
            let values: Vec<f32> = weights(name, shape.iter().product()).into_iter().map(|v| v as f32).collect();
            let tensor = Tensor::from_vec(values, shape, &Device::Cpu)?;
            let tensor = match t["dtype"].as_str() {
                Some("float32") => tensor,
                Some("bfloat16") => tensor.to_dtype(DType::BF16)?,
                other => anyhow::bail!("dtype {other:?} of {name} in the reference"),
            };
            tensors.insert(name.to_string(), tensor);
        }
        let out = file["file"].as_str().ok_or_else(|| anyhow::anyhow!("{file}: no file name"))?;
        candle_core::safetensors::save(&tensors, dir.join(out))?;
    }
    Ok(())
}
