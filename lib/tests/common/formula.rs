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
