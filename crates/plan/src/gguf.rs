//! A small GGUF reader: metadata values and tensor shapes, which is all `ane plan` needs.
//!
//! It reads only the header (no tensor data) and checks every length against the file, so a
//! malformed or truncated file gives an error naming the field instead of a panic or a huge
//! allocation.

use std::collections::BTreeMap;

use thiserror::Error;

/// A GGUF read failure, naming what was being read.
#[derive(Debug, Error, PartialEq)]
pub enum GgufError {
    /// The file ended inside a field.
    #[error("GGUF truncated while reading {0}")]
    Truncated(String),
    /// A field holds an impossible value.
    #[error("GGUF field {field}: {detail}")]
    Invalid {
        /// Which field.
        field: String,
        /// What is wrong.
        detail: String,
    },
    /// I/O error.
    #[error("cannot read {path}: {detail}")]
    Io {
        /// File.
        path: String,
        /// OS error.
        detail: String,
    },
}

/// A metadata value (arrays keep only their length and, for strings, nothing else).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Any integer type.
    Int(i128),
    /// f32 or f64.
    Float(f64),
    /// Boolean.
    Bool(bool),
    /// String.
    Str(String),
    /// Array: element count.
    Array(u64),
}

/// One tensor's header entry.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// ggml dims, innermost first (`[K, M]` for a weight matrix).
    pub dims: Vec<u64>,
    /// ggml type.
    pub ty: u32,
}

/// The header of a GGUF file.
#[derive(Clone, Debug, Default)]
pub struct Gguf {
    /// Metadata by key.
    pub meta: BTreeMap<String, Value>,
    /// Tensors by name.
    pub tensors: BTreeMap<String, TensorInfo>,
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| GgufError::Truncated(what.into()))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }
    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let n = self.u64(what)?;
        let n = usize::try_from(n).map_err(|_| GgufError::Truncated(what.into()))?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::Invalid {
            field: what.into(),
            detail: "not UTF-8".into(),
        })
    }
    fn scalar(&mut self, ty: u32, what: &str) -> Result<Value, GgufError> {
        let int = |b: &[u8], signed: bool| -> i128 {
            let mut v = [0u8; 16];
            v[..b.len()].copy_from_slice(b);
            if signed && b[b.len() - 1] & 0x80 != 0 {
                v[b.len()..].fill(0xff);
            }
            i128::from_le_bytes(v)
        };
        Ok(match ty {
            0 | 2 | 4 | 10 => {
                let n = [1, 0, 2, 0, 4, 0, 0, 0, 0, 0, 8][ty as usize];
                Value::Int(int(self.take(n, what)?, false))
            }
            1 | 3 | 5 | 11 => {
                let n = [0, 1, 0, 2, 0, 4, 0, 0, 0, 0, 0, 8][ty as usize];
                Value::Int(int(self.take(n, what)?, true))
            }
            6 => {
                Value::Float(f32::from_le_bytes(self.take(4, what)?.try_into().expect("4")) as f64)
            }
            12 => Value::Float(f64::from_le_bytes(
                self.take(8, what)?.try_into().expect("8"),
            )),
            7 => Value::Bool(self.take(1, what)?[0] != 0),
            8 => Value::Str(self.string(what)?),
            other => {
                return Err(GgufError::Invalid {
                    field: what.into(),
                    detail: format!("unknown value type {other}"),
                })
            }
        })
    }
}

impl Gguf {
    /// Parses a GGUF header from its bytes (the file may be cut right after the tensor infos).
    ///
    /// # Errors
    /// Bad magic or version, truncation, unknown value types, absurd counts.
    pub fn parse(bytes: &[u8]) -> Result<Gguf, GgufError> {
        let mut r = Reader { b: bytes, pos: 0 };
        if r.take(4, "magic")? != b"GGUF" {
            return Err(GgufError::Invalid {
                field: "magic".into(),
                detail: "not a GGUF file".into(),
            });
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Invalid {
                field: "version".into(),
                detail: format!("{version} (expected 2 or 3)"),
            });
        }
        let n_tensors = r.u64("tensor_count")?;
        let n_kv = r.u64("metadata_kv_count")?;
        // Every entry takes at least 8+4 bytes: anything larger than the file is a lie.
        for (n, field) in [(n_tensors, "tensor_count"), (n_kv, "metadata_kv_count")] {
            if n > bytes.len() as u64 / 12 {
                return Err(GgufError::Invalid {
                    field: field.into(),
                    detail: format!("{n} entries in a {}-byte file", bytes.len()),
                });
            }
        }
        let mut g = Gguf::default();
        for i in 0..n_kv {
            let key = r.string(&format!("metadata key #{i}"))?;
            let ty = r.u32(&format!("type of {key}"))?;
            let v = if ty == 9 {
                let ety = r.u32(&format!("element type of {key}"))?;
                let n = r.u64(&format!("length of {key}"))?;
                for j in 0..n {
                    if ety == 9 {
                        return Err(GgufError::Invalid {
                            field: key.clone(),
                            detail: "nested arrays not supported".into(),
                        });
                    }
                    r.scalar(ety, &format!("{key}[{j}]"))?;
                }
                Value::Array(n)
            } else {
                r.scalar(ty, &key)?
            };
            g.meta.insert(key, v);
        }
        for i in 0..n_tensors {
            let name = r.string(&format!("tensor #{i} name"))?;
            let nd = r.u32(&format!("{name} n_dims"))?;
            if nd > 4 {
                return Err(GgufError::Invalid {
                    field: format!("{name} n_dims"),
                    detail: format!("{nd} > 4"),
                });
            }
            let dims = (0..nd)
                .map(|d| r.u64(&format!("{name} dim {d}")))
                .collect::<Result<Vec<_>, _>>()?;
            let ty = r.u32(&format!("{name} type"))?;
            r.u64(&format!("{name} offset"))?;
            g.tensors.insert(name, TensorInfo { dims, ty });
        }
        Ok(g)
    }

    /// Reads and parses a file.
    ///
    /// # Errors
    /// I/O errors and everything [`Gguf::parse`] rejects.
    pub fn read(path: &std::path::Path) -> Result<Gguf, GgufError> {
        let bytes = std::fs::read(path).map_err(|e| GgufError::Io {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        Gguf::parse(&bytes)
    }

    /// An integer metadata value.
    pub fn int(&self, key: &str) -> Option<i128> {
        match self.meta.get(key) {
            Some(Value::Int(i)) => Some(*i),
            _ => None,
        }
    }

    /// A string metadata value.
    pub fn str(&self, key: &str) -> Option<&str> {
        match self.meta.get(key) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(out: &mut Vec<u8>, v: &str) {
        out.extend((v.len() as u64).to_le_bytes());
        out.extend(v.as_bytes());
    }

    fn sample() -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes()); // tensors
        b.extend(3u64.to_le_bytes()); // kv
        s(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        s(&mut b, "llama");
        s(&mut b, "llama.block_count");
        b.extend(4u32.to_le_bytes());
        b.extend(2u32.to_le_bytes());
        s(&mut b, "tokenizer.ggml.tokens");
        b.extend(9u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        s(&mut b, "a");
        s(&mut b, "b");
        s(&mut b, "blk.0.attn_q.weight");
        b.extend(2u32.to_le_bytes());
        b.extend(256u64.to_le_bytes());
        b.extend(128u64.to_le_bytes());
        b.extend(1u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b
    }

    #[test]
    fn reads_metadata_and_tensors() {
        let g = Gguf::parse(&sample()).unwrap();
        assert_eq!(g.str("general.architecture"), Some("llama"));
        assert_eq!(g.int("llama.block_count"), Some(2));
        assert_eq!(g.meta["tokenizer.ggml.tokens"], Value::Array(2));
        assert_eq!(
            g.tensors["blk.0.attn_q.weight"],
            TensorInfo {
                dims: vec![256, 128],
                ty: 1
            }
        );
    }

    #[test]
    fn every_truncation_is_an_error_naming_a_field() {
        let full = sample();
        for cut in 0..full.len() {
            let e = Gguf::parse(&full[..cut]).unwrap_err();
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn rejects_bad_magic_and_version() {
        let mut b = sample();
        b[0] = b'X';
        assert!(
            matches!(Gguf::parse(&b), Err(GgufError::Invalid { ref field, .. }) if field == "magic")
        );
        let mut b = sample();
        b[4] = 9;
        assert!(
            matches!(Gguf::parse(&b), Err(GgufError::Invalid { ref field, .. }) if field == "version")
        );
    }
}
