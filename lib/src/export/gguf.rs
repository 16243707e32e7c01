//! A streaming GGUF v3 writer.
//!
//! candle's `gguf_file::write` needs every tensor quantized in memory at once (an 8B
//! model exported at f16 would hold 16 GB). This writer lays the file out from the
//! tensors' names, shapes and types alone, then asks for each tensor's bytes in file
//! order and writes them straight through: one tensor is in memory at a time. The
//! file is written beside its destination and renamed into place at the end
//! ([`crate::files::write_atomic_with`]), so an interrupted export leaves nothing
//! under the final name.
//!
//! Layout (GGUF v3, little-endian): magic `GGUF`, version 3, tensor count (u64),
//! key-value count (u64), the key-values, the tensor infos (name, dimension count,
//! dimensions innermost first, type, offset), padding to the alignment (32), then each
//! tensor's data at its offset, each padded to the alignment.

use anyhow::{Context, Result, bail};
use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::Value;
use std::io::Write;
use std::path::Path;

/// Every tensor's data starts at a multiple of this (llama.cpp's default; the file
/// does not set `general.alignment`).
pub const ALIGNMENT: u64 = 32;

/// One tensor as the file will describe it.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    /// GGUF name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Shape in row-major (numpy / Hugging Face) order: `[rows, cols]` for a matrix.
    pub shape: Vec<usize>,
    /// Storage type.
    pub dtype: GgmlDType,
}

impl TensorSpec {
    /// Bytes of this tensor's data (without padding).
    pub fn nbytes(&self) -> Result<usize> {
        let n: usize = self.shape.iter().product();
        let bs = self.dtype.block_size();
        let row = *self.shape.last().unwrap_or(&1);
        if row % bs != 0 {
            bail!("tensor `{}`: a row of {row} values is not a whole number of {:?} blocks of {bs}", self.name, self.dtype);
        }
        Ok(n / bs * self.dtype.type_size())
    }
}

/// The numeric id of a tensor type in GGUF files (ggml's `ggml_type`).
pub fn type_id(d: GgmlDType) -> u32 {
    match d {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// The numeric id GGUF files use for a value type.
fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn write_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_value(w: &mut impl Write, key: &str, v: &Value) -> Result<()> {
    match v {
        Value::U8(x) => w.write_all(&[*x])?,
        Value::I8(x) => w.write_all(&x.to_le_bytes())?,
        Value::U16(x) => w.write_all(&x.to_le_bytes())?,
        Value::I16(x) => w.write_all(&x.to_le_bytes())?,
        Value::U32(x) => w.write_all(&x.to_le_bytes())?,
        Value::I32(x) => w.write_all(&x.to_le_bytes())?,
        Value::F32(x) => w.write_all(&x.to_le_bytes())?,
        Value::Bool(x) => w.write_all(&[u8::from(*x)])?,
        Value::String(s) => write_str(w, s)?,
        Value::U64(x) => w.write_all(&x.to_le_bytes())?,
        Value::I64(x) => w.write_all(&x.to_le_bytes())?,
        Value::F64(x) => w.write_all(&x.to_le_bytes())?,
        Value::Array(items) => {
            let t = items.first().map(value_type).unwrap_or(4);
            if let Some(bad) = items.iter().find(|i| value_type(i) != t) {
                bail!("metadata `{key}`: an array mixes types ({t} and {})", value_type(bad));
            }
            if t == 9 {
                bail!("metadata `{key}`: arrays of arrays are not written");
            }
            w.write_all(&t.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            for i in items {
                write_value(w, key, i)?;
            }
        }
    }
    Ok(())
}

fn pad(w: &mut impl Write, written: u64) -> std::io::Result<u64> {
    let rem = written % ALIGNMENT;
    if rem == 0 {
        return Ok(0);
    }
    let n = ALIGNMENT - rem;
    w.write_all(&vec![0u8; n as usize])?;
    Ok(n)
}

/// Counts what passes through, for offsets and padding.
struct Counting<'a, W: Write> {
    inner: &'a mut W,
    n: u64,
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a GGUF file at `path`: `metadata` in order, then `tensors`, whose bytes
/// `data(i, spec)` produces one at a time in order. A wrong byte count, a duplicate
/// key or tensor name, or a failing `data` leaves nothing at `path`.
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[TensorSpec],
    mut data: impl FnMut(usize, &TensorSpec) -> Result<Vec<u8>>,
) -> Result<u64> {
    let mut seen = std::collections::HashSet::new();
    for (k, _) in metadata {
        if !seen.insert(k.as_str()) {
            bail!("metadata key `{k}` is given twice");
        }
    }
    let mut names = std::collections::HashSet::new();
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut offset = 0u64;
    for t in tensors {
        if !names.insert(t.name.as_str()) {
            bail!("tensor `{}` is given twice", t.name);
        }
        offsets.push(offset);
        let n = t.nbytes()? as u64;
        offset += n.div_ceil(ALIGNMENT) * ALIGNMENT;
    }
    let mut total = 0u64;
    crate::files::write_atomic_with(path, |w| {
        let mut w = Counting { inner: w, n: 0 };
        w.write_all(b"GGUF")?;
        w.write_all(&3u32.to_le_bytes())?;
        w.write_all(&(tensors.len() as u64).to_le_bytes())?;
        w.write_all(&(metadata.len() as u64).to_le_bytes())?;
        for (k, v) in metadata {
            write_str(&mut w, k)?;
            w.write_all(&value_type(v).to_le_bytes())?;
            write_value(&mut w, k, v)?;
        }
        for (t, off) in tensors.iter().zip(&offsets) {
            write_str(&mut w, &t.name)?;
            w.write_all(&(t.shape.len() as u32).to_le_bytes())?;
            // GGUF lists dimensions innermost first (ggml's ne[0] is the row length).
            for d in t.shape.iter().rev() {
                w.write_all(&(*d as u64).to_le_bytes())?;
            }
            w.write_all(&type_id(t.dtype).to_le_bytes())?;
            w.write_all(&off.to_le_bytes())?;
        }
        let n = w.n;
        pad(&mut w, n)?;
        let start = w.n;
        for (i, (t, off)) in tensors.iter().zip(&offsets).enumerate() {
            let bytes = data(i, t).with_context(|| format!("tensor `{}`", t.name))?;
            let want = t.nbytes()?;
            if bytes.len() != want {
                bail!("tensor `{}`: {} bytes produced, {want} expected for {:?} {:?}", t.name, bytes.len(), t.dtype, t.shape);
            }
            debug_assert_eq!(w.n - start, *off);
            w.write_all(&bytes)?;
            let n = w.n;
            pad(&mut w, n)?;
        }
        total = w.n;
        Ok(())
    })?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::Content;

    #[test]
    fn candle_reads_back_every_key_and_tensor_the_writer_streams() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let md = vec![
            ("general.architecture".to_string(), Value::String("llama".into())),
            ("x.u32".to_string(), Value::U32(7)),
            ("x.f32".to_string(), Value::F32(0.5)),
            ("x.bool".to_string(), Value::Bool(true)),
            ("x.strs".to_string(), Value::Array(vec![Value::String("a b".into()), Value::String("ü".into())])),
            ("x.i32s".to_string(), Value::Array(vec![Value::I32(1), Value::I32(-3)])),
        ];
        let tensors = vec![
            TensorSpec { name: "a".into(), shape: vec![3], dtype: GgmlDType::F32 },
            TensorSpec { name: "b".into(), shape: vec![2, 32], dtype: GgmlDType::Q8_0 },
        ];
        let src: Vec<f32> = (0..64).map(|i| (i as f32 - 30.0) / 7.0).collect();
        let q = candle_core::quantized::QTensor::quantize(
            &candle_core::Tensor::from_vec(src.clone(), (2, 32), &candle_core::Device::Cpu).unwrap(),
            GgmlDType::Q8_0,
        )
        .unwrap();
        let qbytes = q.data().unwrap().to_vec();
        write_gguf(&path, &md, &tensors, |i, _| {
            Ok(if i == 0 { [1f32, 2., 3.].iter().flat_map(|x| x.to_le_bytes()).collect() } else { qbytes.clone() })
        })
        .unwrap();
        let mut f = std::fs::File::open(&path).unwrap();
        let c = Content::read(&mut f).unwrap();
        assert_eq!(c.metadata["x.u32"].to_u32().unwrap(), 7);
        assert_eq!(c.metadata["x.f32"].to_f32().unwrap(), 0.5);
        assert!(c.metadata["x.bool"].to_bool().unwrap());
        assert_eq!(c.metadata["x.strs"].to_vec().unwrap()[1].to_string().unwrap(), "ü");
        assert_eq!(c.metadata["x.i32s"].to_vec().unwrap()[1].to_i32().unwrap(), -3);
        let a = c.tensor(&mut f, "a", &candle_core::Device::Cpu).unwrap().dequantize(&candle_core::Device::Cpu).unwrap();
        assert_eq!(a.to_vec1::<f32>().unwrap(), vec![1., 2., 3.]);
        let b = c.tensor(&mut f, "b", &candle_core::Device::Cpu).unwrap();
        assert_eq!(b.shape().dims(), &[2, 32]);
        assert_eq!(b.data().unwrap().to_vec(), qbytes);
        assert_eq!(c.tensor_data_offset % ALIGNMENT, 0);
    }

    #[test]
    fn a_wrong_byte_count_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let tensors = vec![TensorSpec { name: "a".into(), shape: vec![4], dtype: GgmlDType::F32 }];
        let err = write_gguf(&path, &[], &tensors, |_, _| Ok(vec![0u8; 12])).unwrap_err();
        assert!(format!("{err:#}").contains("12 bytes produced, 16 expected"), "{err:#}");
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "no temporary file is left behind");
    }

    #[test]
    fn a_row_that_is_not_whole_blocks_is_refused_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let tensors = vec![TensorSpec { name: "w".into(), shape: vec![2, 576], dtype: GgmlDType::Q4K }];
        let err = write_gguf(&path, &[], &tensors, |_, _| Ok(vec![])).unwrap_err();
        assert!(format!("{err:#}").contains("576 values is not a whole number of Q4K blocks of 256"), "{err:#}");
        assert!(!path.exists());
    }
}
