//! Tidy checks on xtask itself, run by `cargo test`: every module must say
//! why it exists in a leading `//!` doc comment.

#[cfg(test)]
mod tests {
    #[test]
    fn every_module_starts_with_a_doc_comment() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut missing = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                if !text.starts_with("//!") {
                    missing.push(path.display().to_string());
                }
            }
        }
        assert!(missing.is_empty(), "no leading `//!` doc: {missing:?}");
    }
}
