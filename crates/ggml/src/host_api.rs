//! Which ggml backend API the host speaks, told from what its ggml exports.
//!
//! ggml's loader accepts a plugin only if `reg->api_version` equals its own
//! `GGML_BACKEND_API_VERSION`, a macro the host never exports; and a plugin built for one version
//! loaded by another would read its structs with the wrong layout. So before anything else,
//! `ggml_backend_score` asks here:
//!
//! - **API 3** (ggml 0.26, llama.cpp b11434): `ggml_version()` is 0.26.x, the buffer-type functions
//!   `ggml_backend_buft_alloc_buffer_n` / `ggml_backend_buft_get_alloc_size_n` exist (new in API 3),
//!   and `ggml_backend_buft_get_alloc_interface` (new after it) does not.
//! - **API 2** (ggml 0.16 to 0.25, llama.cpp b11349 is the newest): neither API 3 function, the
//!   meta-backend's `ggml_backend_meta_alloc_ctx_tensors_from_buft` present, no
//!   `ggml_backend_buft_get_alloc_interface`. ggml 0.16 is the floor because the plugin's
//!   `ggml_backend_i` and op numbering (`GGML_OP_MUL_MAT` = 29) hold from 0.10 and the type count
//!   from 0.16.
//! - **anything else** (no `ggml_version`, another version, API 4 to 6 whose buffer-type structs
//!   differ): unsupported. The plugin says so in one line, scores 0 (the loader then skips it) and
//!   `ggml_backend_init` returns NULL, so no struct is ever read with a guessed layout.
//!
//! Every struct the plugin fills or reads is byte-identical between API 2 and API 3 (the only
//! change, two buffer-type methods, is in a struct the plugin treats as opaque), so the one set of
//! vtables serves both and only `reg->api_version` differs. Finally the op names are checked:
//! `ggml_op_name(GGML_OP_MUL_MAT)` must be `MUL_MAT`, or the numbering moved.

use std::ffi::{c_char, CStr};
use std::sync::OnceLock;

/// What the plugin makes of its host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostApi {
    /// A supported backend API version (2 or 3), with the host's ggml version.
    Supported {
        /// `GGML_BACKEND_API_VERSION` of the host.
        api: i32,
        /// `ggml_version()`.
        ggml: String,
    },
    /// Not one the plugin can serve: the one line to print.
    Unsupported(String),
}

/// The versions the plugin supports, for messages.
pub const SUPPORTED: &str = "ggml backend API 2 (ggml 0.16 to 0.25, e.g. llama.cpp b11349) \
    and API 3 (ggml 0.26, llama.cpp b11434)";

/// Op numbers whose names are checked (`enum ggml_op` of both supported versions).
pub const OP_NAMES: [(i32, &str); 3] = [(29, "MUL_MAT"), (30, "MUL_MAT_ID"), (37, "VIEW")];

/// Symbols told apart (see the module doc).
const ALLOC_N: &str = "ggml_backend_buft_alloc_buffer_n";
const ALLOC_SIZE_N: &str = "ggml_backend_buft_get_alloc_size_n";
const ALLOC_INTERFACE: &str = "ggml_backend_buft_get_alloc_interface";
const META_ALLOC: &str = "ggml_backend_meta_alloc_ctx_tensors_from_buft";

fn minor(version: &str) -> Option<(u32, u32)> {
    let mut it = version.trim().split('.');
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

/// The decision, from the host's `ggml_version()` (if exported), which symbols it exports, and
/// its op names.
pub fn classify(
    version: Option<&str>,
    exports: impl Fn(&str) -> bool,
    op_name: impl Fn(i32) -> Option<String>,
) -> HostApi {
    let refuse = |what: String| {
        HostApi::Unsupported(format!(
            "ggml-ane: not loading: {what}; this plugin supports {SUPPORTED}. Build one of those \
             llama.cpp versions (in the ggml-ane repository `cargo xtask llama` builds both \
             from their PyPI sdists)"
        ))
    };
    let Some(version) = version else {
        return refuse(
            "the host's ggml exports no ggml_version() (ggml older than 0.16, or not ggml)".into(),
        );
    };
    let api = match (minor(version), exports(ALLOC_INTERFACE)) {
        (_, true) => None,
        (Some((0, 26)), false) if exports(ALLOC_N) && exports(ALLOC_SIZE_N) => Some(3),
        (Some((0, m)), false)
            if (16..=25).contains(&m)
                && !exports(ALLOC_N)
                && !exports(ALLOC_SIZE_N)
                && exports(META_ALLOC) =>
        {
            Some(2)
        }
        _ => None,
    };
    let Some(api) = api else {
        return refuse(format!(
            "the host's ggml {version} speaks a ggml backend API this plugin was not built for"
        ));
    };
    for (op, name) in OP_NAMES {
        let got = op_name(op);
        if got.as_deref() != Some(name) {
            return refuse(format!(
                "the host's ggml {version} numbers its ops differently (op {op} is {got:?}, not {name})"
            ));
        }
    }
    HostApi::Supported {
        api,
        ggml: version.to_string(),
    }
}

/// The host's API, probed once.
pub fn host_api() -> &'static HostApi {
    static API: OnceLock<HostApi> = OnceLock::new();
    API.get_or_init(probe)
}

fn probe() -> HostApi {
    use crate::ggml::find_symbol;
    let cstr = |p: *const c_char| {
        // SAFETY: ggml returns static NUL-terminated strings (or NULL).
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    };
    let version = find_symbol(c"ggml_version").and_then(|f| {
        // SAFETY: `const char * ggml_version(void)` in every ggml that exports it.
        let f: unsafe extern "C" fn() -> *const c_char = unsafe { std::mem::transmute(f) };
        // SAFETY: no arguments, no preconditions.
        cstr(unsafe { f() })
    });
    let exports = |name: &str| {
        let c = std::ffi::CString::new(name).expect("symbol names have no NUL");
        find_symbol(&c).is_some()
    };
    let op_name_fn = find_symbol(c"ggml_op_name");
    let op_name = |op: i32| {
        let f = op_name_fn?;
        // SAFETY: `const char * ggml_op_name(enum ggml_op)`; the ops asked about exist in every
        // ggml with a ggml_version() (it indexes a table without a bounds check).
        let f: unsafe extern "C" fn(i32) -> *const c_char = unsafe { std::mem::transmute(f) };
        // SAFETY: as above.
        cstr(unsafe { f(op) })
    };
    classify(version.as_deref(), exports, op_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(version: Option<&str>, syms: &[&str]) -> HostApi {
        let syms: Vec<String> = syms.iter().map(|s| s.to_string()).collect();
        classify(
            version,
            |n| syms.iter().any(|s| s == n),
            |op| {
                OP_NAMES
                    .iter()
                    .find(|(o, _)| *o == op)
                    .map(|(_, n)| n.to_string())
            },
        )
    }

    const V3: [&str; 3] = [ALLOC_N, ALLOC_SIZE_N, "ggml_backend_meta_n_backends"];
    const V2: [&str; 2] = [META_ALLOC, "ggml_backend_meta_n_backends"];

    #[test]
    fn b11434_is_api_3_and_b11349_is_api_2() {
        assert_eq!(
            host(Some("0.26.0"), &V3),
            HostApi::Supported {
                api: 3,
                ggml: "0.26.0".into()
            }
        );
        assert_eq!(
            host(Some("0.25.3"), &V2),
            HostApi::Supported {
                api: 2,
                ggml: "0.25.3".into()
            }
        );
        assert!(matches!(
            host(Some("0.16.0"), &V2),
            HostApi::Supported { api: 2, .. }
        ));
    }

    #[test]
    fn other_hosts_are_refused_in_one_line_naming_what_works() {
        let cases = [
            (None, &V3[..], "no ggml_version"),
            (Some("0.27.1"), &V3[..], "ggml 0.27.1"),
            // API 6 exports the alloc interface and looks like API 2 by the other symbols.
            (
                Some("0.25.3"),
                &[META_ALLOC, ALLOC_INTERFACE][..],
                "ggml 0.25.3",
            ),
            (Some("0.15.0"), &V2[..], "ggml 0.15.0"),
            // Version and symbols disagree.
            (Some("0.26.0"), &V2[..], "ggml 0.26.0"),
            (Some("0.25.3"), &V3[..], "ggml 0.25.3"),
            (Some("garbage"), &V3[..], "ggml garbage"),
        ];
        for (v, syms, says) in cases {
            match host(v, syms) {
                HostApi::Unsupported(line) => {
                    assert!(line.contains(says), "{line}");
                    assert!(line.contains(SUPPORTED), "{line}");
                    assert!(line.contains("cargo xtask llama"), "{line}");
                    assert!(!line.contains('\n'), "{line}");
                }
                ok => panic!("{v:?} {syms:?} accepted as {ok:?}"),
            }
        }
    }

    #[test]
    fn moved_op_numbers_are_refused() {
        let r = classify(
            Some("0.26.0"),
            |n| V3.contains(&n),
            |op| Some(if op == 29 { "MUL" } else { "VIEW" }.to_string()),
        );
        match r {
            HostApi::Unsupported(l) => assert!(l.contains("op 29"), "{l}"),
            ok => panic!("{ok:?}"),
        }
    }
}
