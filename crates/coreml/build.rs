//! Compiles Apple's Core ML `.proto` files (vendored in `proto/`, BSD-3-Clause) to Rust with
//! prost, parsing them with protox, a pure-Rust `.proto` compiler, so no `protoc` is needed.

fn main() {
    let files: Vec<std::path::PathBuf> = std::fs::read_dir("proto")
        .expect("proto/ directory")
        .map(|e| e.expect("proto/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "proto"))
        .collect();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, ["proto"]).expect("Core ML protos compile");
    prost_build::Config::new()
        // Deterministic bytes: maps encode in key order.
        .btree_map(["."])
        // Apple's comments hold indented blocks that rustdoc would run as doctests.
        .disable_comments(["."])
        .include_file("coreml.rs")
        .compile_fds(fds)
        .expect("prost-build");
}
