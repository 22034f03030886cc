//! Typed MIL programs for the Apple Neural Engine: an IR, a textual MIL emitter and parser, and a
//! MILBlob v2 weight-file writer and reader.
//!
//! The ANE compiler takes a program as *text* (`model.mil`) plus weight files (`weight.bin`), not
//! as the protobuf Core ML uses. This crate exists so that the backend never builds that text by
//! string concatenation: programs are plain data ([`Program`]), built through typed constructors
//! ([`build`]), written by one emitter ([`text::emit`]) and read back by one parser
//! ([`text::parse`]), so a reference engine can run exactly what the ANE would be given.
//!
//! # Layout
//!
//! - The IR types ([`Program`], [`Function`], [`Statement`], ...) live in a private module and are
//!   re-exported here, because users name the types, never the module.
//! - [`text`]: MIL text. The emitter writes the dialect the direct-ANE projects feed the compiler
//!   (`program(1.3)`, coremltools 9.0 `buildInfo`, `func main<ios18>`); floats are written as exact
//!   hexadecimal floats so that no value changes on the way through text.
//! - [`blob`]: MILBlob v2, byte for byte as coremltools' own writer produces it. A wrong header
//!   field is suspected to be why some chips reject hand-written blobs, so the writer fills every
//!   field correctly and the reader checks every field.
//! - [`build`]: statement constructors with coremltools' argument names and the program forms the
//!   backend emits.
//!
//! # Examples
//!
//! ```
//! let p = ane_mil::build::conv_matmul(64, 96, 32);
//! let src = ane_mil::text::emit(&p);
//! assert_eq!(ane_mil::text::parse(&src).unwrap(), p);
//! ```
#![warn(missing_docs)]

mod ir;

pub use ir::*;

pub mod blob;
pub mod build;
pub mod text;
