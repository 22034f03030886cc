//! The `.mlpackage` directory, as coremltools' `ModelPackage` writes it:
//!
//! ```text
//! OUT.mlpackage/Manifest.json
//! OUT.mlpackage/Data/com.apple.CoreML/model.mlmodel        the Model protobuf
//! OUT.mlpackage/Data/com.apple.CoreML/weights/weight.bin   MILBlob v2, `@model_path/weights/weight.bin`
//! ```
//!
//! The manifest's item identifiers are UUID-shaped hashes of the model bytes, not random UUIDs, so
//! the same program always gives the same package.

use std::path::{Path, PathBuf};

use prost::Message as _;

use crate::Model;

/// Folder inside `Data/` that holds the model and its weights.
pub const CORE_ML_DIR: &str = "com.apple.CoreML";
/// What `@model_path/` in a BLOBFILE path stands for: `Data/com.apple.CoreML`.
pub const MODEL_PATH_PREFIX: &str = "@model_path/";

/// Errors of package I/O.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// File system error, with the path.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A malformed manifest or model file.
    #[error("{0}")]
    Format(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PackageError + '_ {
    move |source| PackageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A UUID-shaped (version 4, variant 1) FNV-1a/SplitMix hash of `bytes` and `salt`.
fn uuid_of(bytes: &[u8], salt: u64) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ salt;
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let (a, b) = (mix(h), mix(h ^ 0x9e37_79b9_7f4a_7c15));
    let a = (a & !0xf000) | 0x4000;
    let b = (b & !(0xc000 << 48)) | (0x8000 << 48);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

/// The `Manifest.json` of a package whose model encodes to `model_bytes`.
pub fn manifest(model_bytes: &[u8]) -> serde_json::Value {
    let model_id = uuid_of(model_bytes, 1);
    let weights_id = uuid_of(model_bytes, 2);
    serde_json::json!({
        "fileFormatVersion": "1.0.0",
        "itemInfoEntries": {
            model_id.clone(): {
                "author": "com.apple.CoreML",
                "description": "CoreML Model Specification",
                "name": "model.mlmodel",
                "path": format!("{CORE_ML_DIR}/model.mlmodel"),
            },
            weights_id: {
                "author": "com.apple.CoreML",
                "description": "CoreML Model Weights",
                "name": "weights",
                "path": format!("{CORE_ML_DIR}/weights"),
            },
        },
        "rootModelIdentifier": model_id,
    })
}

/// Writes `dir` (e.g. `OUT.mlpackage`) holding `model` and the weight files `weights`, each given
/// by its BLOBFILE path (`@model_path/weights/weight.bin`) and bytes. An existing package at `dir`
/// is replaced; anything else there is left alone and is an error, because replacing means
/// deleting the folder and a mistyped path must not cost the user a directory.
///
/// # Errors
///
/// A weight path outside `@model_path/weights/`, something other than a package (a folder with a
/// `Manifest.json`) at `dir`, or an I/O error naming the path.
pub fn write(dir: &Path, model: &Model, weights: &[(&str, &[u8])]) -> Result<(), PackageError> {
    let files = weights
        .iter()
        .map(|(path, bytes)| {
            path.strip_prefix(MODEL_PATH_PREFIX)
                .and_then(|r| r.strip_prefix("weights/"))
                .filter(|r| !r.is_empty() && !r.contains('/') && !r.contains(".."))
                .map(|name| (name, *bytes))
                .ok_or_else(|| {
                    PackageError::Format(format!(
                        "weight path `{path}` is not @model_path/weights/NAME"
                    ))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if dir.symlink_metadata().is_ok() {
        if !dir.is_dir() || !dir.join("Manifest.json").is_file() {
            return Err(PackageError::Format(format!(
                "{} exists and is not a Core ML package (no Manifest.json): not replacing it",
                dir.display()
            )));
        }
        std::fs::remove_dir_all(dir).map_err(io(dir))?;
    }
    let data = dir.join("Data").join(CORE_ML_DIR);
    let wdir = data.join("weights");
    std::fs::create_dir_all(&wdir).map_err(io(&wdir))?;
    let bytes = model.encode_to_vec();
    let mpath = data.join("model.mlmodel");
    std::fs::write(&mpath, &bytes).map_err(io(&mpath))?;
    for (name, data_bytes) in files {
        let wpath = wdir.join(name);
        std::fs::write(&wpath, data_bytes).map_err(io(&wpath))?;
    }
    let man = dir.join("Manifest.json");
    let text = serde_json::to_string_pretty(&manifest(&bytes)).expect("json");
    std::fs::write(&man, text + "\n").map_err(io(&man))?;
    Ok(())
}

/// A package read back: its model and its weight files by BLOBFILE path.
#[derive(Debug)]
pub struct Package {
    /// The decoded `model.mlmodel`.
    pub model: Model,
    /// `(@model_path/weights/NAME, bytes)`, sorted by name.
    pub weights: Vec<(String, Vec<u8>)>,
}

/// Reads a package written by [`write`] (or by coremltools): the manifest's root model item, and
/// every file in its `weights` folder.
///
/// # Errors
///
/// A missing or malformed manifest, a root item that is not there, a model that does not decode,
/// or an I/O error.
pub fn read(dir: &Path) -> Result<Package, PackageError> {
    let man_path = dir.join("Manifest.json");
    let man: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&man_path).map_err(io(&man_path))?)
            .map_err(|e| PackageError::Format(format!("{}: {e}", man_path.display())))?;
    let root = man["rootModelIdentifier"]
        .as_str()
        .ok_or_else(|| PackageError::Format("manifest has no rootModelIdentifier".into()))?;
    let rel = man["itemInfoEntries"][root]["path"]
        .as_str()
        .ok_or_else(|| PackageError::Format(format!("manifest has no item `{root}`")))?;
    let data = dir.join("Data");
    let mpath = data.join(rel);
    let bytes = std::fs::read(&mpath).map_err(io(&mpath))?;
    let model = Model::decode(bytes.as_slice())
        .map_err(|e| PackageError::Format(format!("{}: {e}", mpath.display())))?;
    let wdir = mpath
        .parent()
        .map(|p| p.join("weights"))
        .unwrap_or_else(|| data.join("weights"));
    let mut weights = Vec::new();
    if wdir.is_dir() {
        for e in std::fs::read_dir(&wdir).map_err(io(&wdir))? {
            let p = e.map_err(io(&wdir))?.path();
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            weights.push((
                format!("{MODEL_PATH_PREFIX}weights/{name}"),
                std::fs::read(&p).map_err(io(&p))?,
            ));
        }
    }
    weights.sort();
    Ok(Package { model, weights })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_shaped_and_deterministic() {
        let u = uuid_of(b"abc", 1);
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"), "{u}");
        assert_eq!(u, uuid_of(b"abc", 1));
        assert_ne!(u, uuid_of(b"abc", 2));
        assert_ne!(u, uuid_of(b"abd", 1));
    }
}
