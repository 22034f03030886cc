//! Where the plugin keeps what it measured on a machine (the split's calibrations), shared by the
//! plugin (`crates/ggml/src/split.rs`) and `ane bench split` / `ane doctor`, which read it.

use std::path::PathBuf;

/// The split's calibrations file inside [`cache_dir`].
pub const SPLIT_FILE: &str = "split-calibrations.tsv";

/// The cache folder: `over` (`GGML_ANE_CACHE_DIR`) when given, else `~/Library/Caches/ggml-ane` on
/// macOS, `$XDG_CACHE_HOME/ggml-ane` or `~/.cache/ggml-ane` elsewhere.
pub fn cache_dir(over: Option<PathBuf>) -> Option<PathBuf> {
    if over.is_some() {
        return over;
    }
    let home = std::env::var_os("HOME").map(PathBuf::from);
    if cfg!(target_vendor = "apple") {
        return home.map(|h| h.join("Library/Caches/ggml-ane"));
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| home.map(|h| h.join(".cache")))
        .map(|c| c.join("ggml-ane"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_override_wins() {
        let d = PathBuf::from("/x/y");
        assert_eq!(cache_dir(Some(d.clone())), Some(d));
    }
}
