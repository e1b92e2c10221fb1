//! Tests that call the C ABI's exports from Rust: bad input (codes, messages, nothing written)
//! and the header's struct layouts. They are unit tests because this crate has no rlib for
//! integration tests to link; the C programs run from `capi/tests/c_abi.rs`.

#[path = "../../../tests/common/mod.rs"]
mod common;

mod abi_layout;
mod bad_input;
mod moe_bad_input;
mod scale_rows_bad_input;

/// `dk_version()` is the Rust crate's version (the header's macros: capi/tests/c_abi.rs).
#[test]
fn dk_version_is_the_crate_version() {
    // SAFETY: dk_version returns a static NUL-terminated string.
    let v = unsafe { std::ffi::CStr::from_ptr(crate::context::dk_version()) };
    assert_eq!(v.to_str().unwrap(), distill_kernels::VERSION);
}

/// `dk_cuda_archs()` lists what the build compiled, the Rust side's list joined by commas.
#[test]
fn dk_cuda_archs_is_the_build_list() {
    // SAFETY: dk_cuda_archs returns a static NUL-terminated string.
    let s = unsafe { std::ffi::CStr::from_ptr(crate::context::dk_cuda_archs()) };
    let want = distill_kernels::device::compiled_cuda_archs().join(",");
    assert_eq!(s.to_str().unwrap(), want);
    for arch in want.split(',').filter(|a| !a.is_empty()) {
        assert!(
            arch.starts_with("sm_") || arch.starts_with("compute_"),
            "{arch}"
        );
    }
}

/// The header's declarations without comments, spacing or the version macros (whose values
/// change with releases, not with the ABI): what the ABI is made of. String literals are kept
/// whole, so a `//` or `/*` inside one is not taken for a comment.
fn declarations(header: &str) -> String {
    let mut code = String::new();
    let mut rest = header;
    while let Some(c) = rest.chars().next() {
        if let Some(after) = rest.strip_prefix("/*") {
            rest = after.find("*/").map_or("", |end| &after[end + 2..]);
            code.push(' ');
        } else if let Some(after) = rest.strip_prefix("//") {
            rest = after.find('\n').map_or("", |end| &after[end..]);
        } else if c == '"' {
            // Up to the closing quote that no backslash escapes (or the end of the line).
            let body = &rest[1..];
            let mut end = body.len();
            let mut escaped = false;
            for (i, ch) in body.char_indices() {
                if ch == '\n' || (ch == '"' && !escaped) {
                    end = i + ch.len_utf8();
                    break;
                }
                escaped = ch == '\\' && !escaped;
            }
            code.push_str(&rest[..1 + end]);
            rest = &body[end..];
        } else {
            code.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    const RELEASE_MACROS: [&str; 5] = [
        "DK_VERSION_MAJOR",
        "DK_VERSION_MINOR",
        "DK_VERSION_PATCH",
        "DK_VERSION_STRING",
        "DK_ABI_VERSION",
    ];
    code.lines()
        .filter(|l| {
            let mut words = l.split_whitespace();
            !(words.next() == Some("#define")
                && words
                    .next()
                    .is_some_and(|name| RELEASE_MACROS.contains(&name)))
        })
        .flat_map(str::split_whitespace)
        .collect::<Vec<_>>()
        .join(" ")
}

/// 64-bit FNV-1a.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `DK_ABI_VERSION` is the library's, and the header's declarations are those recorded for it:
/// a declaration added, removed or changed (a struct, a constant, a signature) without raising
/// the ABI version fails here.
#[test]
fn abi_version_follows_the_declarations() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../include/distill_kernels.h");
    let header = std::fs::read_to_string(path).unwrap();
    let version = header
        .lines()
        .find_map(|l| l.strip_prefix("#define DK_ABI_VERSION "))
        .map(|v| v.trim().parse::<u32>().expect("DK_ABI_VERSION is a number"))
        .expect("the header defines DK_ABI_VERSION");
    assert_eq!(
        version,
        crate::context::ABI_VERSION,
        "DK_ABI_VERSION (include/distill_kernels.h) and C_ABI_VERSION (src/lib.rs) differ"
    );
    assert_eq!(crate::context::dk_abi_version(), version);
    let fingerprint = fnv1a(declarations(&header).as_bytes());
    // The ABI version and the FNV-1a of its declarations, recorded together.
    const RECORDED: (u32, u64) = (3, 0x921c_3a54_cbf2_e875);
    if version == RECORDED.0 {
        assert!(
            fingerprint == RECORDED.1,
            "the C header's declarations changed (fingerprint {fingerprint:#x}, recorded \
             {:#x} for ABI version {version}): raise DK_ABI_VERSION to {} (the header, its \
             history line and C_ABI_VERSION in src/lib.rs), then record ({}, {fingerprint:#x}) here",
            RECORDED.1,
            version + 1,
            version + 1
        );
    } else {
        panic!(
            "DK_ABI_VERSION is {version} but {} is recorded: if the declarations changed, \
             record ({version}, {fingerprint:#x}) here",
            RECORDED.0
        );
    }
}

/// Comments, spacing and the release macros do not count; declarations and string contents do.
#[test]
fn declarations_ignore_comments_and_spacing() {
    let a = "#define DK_VERSION_PATCH 0\n/* doc */ int32_t dk_f(void); // why\n#define DK_X 1\n";
    let b =
        "#define DK_VERSION_PATCH 7\r\nint32_t   dk_f(void);\r\n/* other\n doc */\n#define DK_X 1";
    assert_eq!(declarations(a), declarations(b));
    assert_eq!(declarations(a), "int32_t dk_f(void); #define DK_X 1");
    assert_ne!(
        declarations(a),
        declarations(&a.replace("DK_X 1", "DK_X 2"))
    );
    // Comment markers inside comments and strings; a macro whose name only starts like one.
    let c = "/* a // b /* c */ int x; // d /* e\n#define DK_S \"p//q/*r\\\"s\" /**/ /*/ */";
    assert_eq!(declarations(c), "int x; #define DK_S \"p//q/*r\\\"s\"");
    assert_ne!(declarations(c), declarations(&c.replace("p//q", "p//z")));
    let d = "#define DK_ABI_VERSION_MIN 1\n#define DK_ABI_VERSION 2\n";
    assert_eq!(declarations(d), "#define DK_ABI_VERSION_MIN 1");
}
