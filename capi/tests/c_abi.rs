//! The C ABI from C and C++: c/divergence_test.c, c/moe_test.c, c/fused_test.c,
//! c/attention_test.c and c/thread_exit_test.c are compiled with the system C compiler (found by
//! the `cc` crate), linked against the crate's cdylib (and, separately, its staticlib) and run;
//! c/cpp_client.cpp, a C++17 client, against the cdylib.
//! Also: the header's version macros equal the crate version, and the `dk_` functions the
//! header declares are exactly the ones capi/src exports.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::*;

/// The directory holding the library the C programs link: `DK_CAPI_TEST_LIB_DIR` when set (the
/// GPU check points it at its prebuilt bundle; nothing is built), else `<target>/<profile>` of
/// this test after `cargo build -p distill-kernels-capi` with this test's profile and target
/// directory, run once per test process. That build is needed because `cargo test` does not
/// build a crate's cdylib and staticlib for its integration tests when it has no rlib; it reuses
/// every crate `cargo test` has just built (same profile, same environment: the kernels are not
/// rebuilt) and only links the two libraries. Cargo's command-line options (`--target`,
/// `--config`, ...) are not forwarded; its environment variables are.
fn library_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("DK_CAPI_TEST_LIB_DIR") {
            return PathBuf::from(dir);
        }
        // The test runs from <target>/<profile dir>/deps; `cargo test`'s own profile is `test`,
        // whose directory is `debug`.
        let profile_dir = profile_dir();
        let target = profile_dir.parent().expect("target dir").to_path_buf();
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "test".to_string(),
            Some(name) => name.to_string(),
        };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_string());
        let mut cmd = Command::new(&cargo);
        cmd.args(["build", "-p", "distill-kernels-capi", "--profile", &profile])
            .arg("--target-dir")
            .arg(&target)
            .current_dir(repo_root());
        let out = cmd.output().unwrap_or_else(|e| {
            panic!(
                "cannot run {cargo} ({e}) to build libdistill_kernels: set DK_CAPI_TEST_LIB_DIR \
                 to a folder holding a built libdistill_kernels.so and .a"
            )
        });
        assert!(
            out.status.success(),
            "{} failed (set DK_CAPI_TEST_LIB_DIR to test a library built elsewhere):\n{}",
            describe(&cmd),
            String::from_utf8_lossy(&out.stderr)
        );
        profile_dir
    })
}

fn library(kind: &str) -> PathBuf {
    let name = match (kind, std::env::consts::OS) {
        ("static", _) => "libdistill_kernels.a",
        (_, "macos") => "libdistill_kernels.dylib",
        _ => "libdistill_kernels.so",
    };
    let path = library_dir().join(name);
    assert!(path.exists(), "{} not found", path.display());
    path
}

fn cuda_expected() -> &'static str {
    if cuda_unavailable().is_none() {
        "1"
    } else {
        "0"
    }
}

fn run_c_program(exe: &Path, lib_dir: &Path) {
    let seed = Rng::fresh("c_program").next_u64();
    let mut cmd = Command::new(exe);
    cmd.arg(seed.to_string())
        .arg(cuda_expected())
        .env("LD_LIBRARY_PATH", lib_dir)
        .env("DYLD_LIBRARY_PATH", lib_dir);
    let (ok, out) = run_command(&mut cmd);
    println!("{out}");
    assert!(ok, "C test program failed (seed {seed}):\n{out}");
    assert!(out.contains(", 0 failures"), "{out}");
    if cuda_expected() == "0" {
        visible("SKIPPED cuda part of the C ABI program: no CUDA device or no compiled kernels");
    }
}

/// How a C test program links the library.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Link {
    Dynamic,
    Static,
}

/// Compiles c/`source` (C99, or C++17 for a `.cpp` file) against the cdylib or the staticlib
/// and runs it.
fn c_program(test: &str, source: &str, link: Link) {
    if link == Link::Static && std::env::consts::OS != "linux" {
        visible(&format!(
            "SKIPPED {test}: native link flags only known for Linux"
        ));
        return;
    }
    let lib = library(match link {
        Link::Dynamic => "dynamic",
        Link::Static => "static",
    });
    let (program, cpp) = match source.strip_suffix(".cpp") {
        Some(stem) => (stem, true),
        None => (source.strip_suffix(".c").expect("a .c or .cpp file"), false),
    };
    let compiler = if cpp {
        cpp_compiler(test).map(|mut c| {
            c.arg("-pedantic");
            c
        })
    } else {
        c_compiler(test)
    };
    let Some(mut cmd) = compiler else {
        return;
    };
    let dir = scratch_dir(test);
    let exe = dir.join(program);
    let root = repo_root();
    cmd.arg("-I")
        .arg(root.join("include"))
        .arg("-I")
        .arg(root.join("capi/tests/c"))
        .arg(root.join("capi/tests/c").join(source))
        .arg("-o")
        .arg(&exe);
    let lib_dir = match link {
        Link::Dynamic => {
            let lib_dir = lib.parent().unwrap().to_path_buf();
            cmd.arg(format!("-L{}", lib_dir.display()))
                .arg("-ldistill_kernels")
                .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
                .arg("-lm");
            lib_dir
        }
        Link::Static => {
            cmd.arg(&lib)
                // What rustc's --print native-static-libs lists for a std staticlib on Linux.
                .args([
                    "-lgcc_s",
                    "-lutil",
                    "-lrt",
                    "-lpthread",
                    "-lm",
                    "-ldl",
                    "-lc",
                ]);
            dir.clone()
        }
    };
    let (ok, out) = run_command(&mut cmd);
    assert!(ok, "compiling / linking {source} ({link:?}) failed:\n{out}");
    run_c_program(&exe, &lib_dir);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn c_program_against_cdylib() {
    c_program("c_program_cdylib", "divergence_test.c", Link::Dynamic);
}

#[test]
fn c_program_against_staticlib() {
    c_program("c_program_staticlib", "divergence_test.c", Link::Static);
}

#[test]
fn c_moe_program_against_cdylib() {
    c_program("c_moe_program_cdylib", "moe_test.c", Link::Dynamic);
}

#[test]
fn c_moe_program_against_staticlib() {
    c_program("c_moe_program_staticlib", "moe_test.c", Link::Static);
}

#[test]
fn c_fused_program_against_cdylib() {
    c_program("c_fused_program_cdylib", "fused_test.c", Link::Dynamic);
}

#[test]
fn c_fused_program_against_staticlib() {
    c_program("c_fused_program_staticlib", "fused_test.c", Link::Static);
}

#[test]
fn c_attention_program_against_cdylib() {
    c_program(
        "c_attention_program_cdylib",
        "attention_test.c",
        Link::Dynamic,
    );
}

#[test]
fn c_attention_program_against_staticlib() {
    c_program(
        "c_attention_program_staticlib",
        "attention_test.c",
        Link::Static,
    );
}

/// dk_ calls from a pthread key's destructor, where the thread's Rust thread-locals may be gone.
#[test]
fn c_thread_exit_program_against_cdylib() {
    c_program(
        "c_thread_exit_program_cdylib",
        "thread_exit_test.c",
        Link::Dynamic,
    );
}

#[test]
fn cpp_program_against_cdylib() {
    c_program("cpp_program_cdylib", "cpp_client.cpp", Link::Dynamic);
}

/// Strips /* */ and // comments.
fn strip_c_comments(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    loop {
        let block = rest.find("/*");
        let line = rest.find("//");
        match (block, line) {
            (Some(b), l) if l.map_or(true, |l| b < l) => {
                out.push_str(&rest[..b]);
                let end = rest[b + 2..].find("*/").expect("unterminated comment") + b + 4;
                rest = &rest[end..];
            }
            (_, Some(l)) => {
                out.push_str(&rest[..l]);
                let end = rest[l..].find('\n').map_or(rest.len(), |e| l + e);
                rest = &rest[end..];
            }
            (None, None) => {
                out.push_str(rest);
                return out;
            }
            (Some(_), None) => unreachable!(),
        }
    }
}

fn ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// `dk_*` identifiers immediately followed by `(`: the functions the header declares.
fn header_functions(header: &str) -> BTreeSet<String> {
    let code = strip_c_comments(header);
    let mut out = BTreeSet::new();
    let bytes: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let at_start = i == 0 || !ident_char(bytes[i - 1]);
        if at_start && code[..].chars().skip(i).take(3).collect::<String>() == "dk_" {
            let mut j = i;
            while j < bytes.len() && ident_char(bytes[j]) {
                j += 1;
            }
            let name: String = bytes[i..j].iter().collect();
            let mut k = j;
            while k < bytes.len() && bytes[k].is_whitespace() {
                k += 1;
            }
            if k < bytes.len() && bytes[k] == '(' {
                out.insert(name);
            }
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// Functions marked `#[no_mangle]` in the Rust sources under `dir`.
fn exported_functions(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    for f in files {
        let src = std::fs::read_to_string(&f).unwrap();
        let mut rest = src.as_str();
        while let Some(pos) = rest.find("#[no_mangle]") {
            rest = &rest[pos + "#[no_mangle]".len()..];
            let fn_pos = rest.find("fn ").expect("fn after #[no_mangle]");
            let name: String = rest[fn_pos + 3..]
                .chars()
                .take_while(|&c| ident_char(c))
                .collect();
            assert!(
                rest[..fn_pos].contains("extern \"C\""),
                "{name} in {} is #[no_mangle] but not extern \"C\"",
                f.display()
            );
            out.insert(name);
        }
    }
    out
}

#[test]
fn header_and_exports_agree() {
    let root = repo_root();
    let header = std::fs::read_to_string(root.join("include/distill_kernels.h")).unwrap();
    let declared = header_functions(&header);
    let exported = exported_functions(&root.join("capi/src"));
    assert!(declared.contains("dk_divergence") && declared.contains("dk_version"));
    for f in [
        "dk_fused_linear_params_default",
        "dk_fused_linear_workspace_size",
        "dk_fused_linear_divergence",
        "dk_attention_params_default",
        "dk_attention_forward",
        "dk_attention_backward_workspace_size",
        "dk_attention_backward",
        "dk_scale_rows",
    ] {
        assert!(declared.contains(f), "{f} is not declared in the header");
    }
    let missing: Vec<_> = declared.difference(&exported).collect();
    let undeclared: Vec<_> = exported.difference(&declared).collect();
    assert!(
        missing.is_empty() && undeclared.is_empty(),
        "declared in the header but not exported: {missing:?}; exported but not declared: {undeclared:?}"
    );
    // Every export starts with dk_.
    for name in &exported {
        assert!(name.starts_with("dk_"), "{name} lacks the dk_ prefix");
    }
    // And the built cdylib really exports them (when `nm` is available).
    let lib = library("dynamic");
    if let Ok(out) = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(&lib)
        .output()
    {
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            let symbols: BTreeSet<String> = text
                .lines()
                .filter_map(|l| l.split_whitespace().last())
                .filter(|s| s.starts_with("dk_"))
                .map(str::to_string)
                .collect();
            assert_eq!(symbols, declared, "dynamic symbols of {}", lib.display());
        }
    }
}

/// The value of `#define NAME value` in include/distill_kernels.h (quotes stripped).
fn header_define(name: &str) -> String {
    let header = std::fs::read_to_string(repo_root().join("include/distill_kernels.h")).unwrap();
    header
        .lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("#define") && w.next() == Some(name))
                .then(|| w.next().unwrap_or("").trim_matches('"').to_string())
        })
        .unwrap_or_else(|| panic!("{name} not defined in the header"))
}

/// The shared library is named by its C ABI version (capi/build.rs), so a program linked against
/// another ABI is refused by the loader instead of misreading the structs, and the name resolves
/// next to the library the C programs above link (they ran, so the loader found it).
#[test]
fn shared_library_soname_is_its_abi_version() {
    if std::env::consts::OS != "linux" {
        visible("SKIPPED shared_library_soname_is_its_abi_version: SONAME set on Linux only");
        return;
    }
    let lib = library("dynamic");
    let soname = format!("libdistill_kernels.so.{}", header_define("DK_ABI_VERSION"));
    let out = match Command::new("readelf").arg("-d").arg(&lib).output() {
        Ok(out) if out.status.success() => out,
        other => {
            visible(&format!(
                "SKIPPED shared_library_soname_is_its_abi_version: readelf -d failed ({other:?})"
            ));
            return;
        }
    };
    let dynamic = String::from_utf8_lossy(&out.stdout);
    let line = dynamic.lines().find(|l| l.contains("(SONAME)"));
    assert!(
        line.is_some_and(|l| l.contains(&format!("[{soname}]"))),
        "{}: SONAME should be {soname}, readelf -d says {line:?}",
        lib.display()
    );
    let link = lib.with_file_name(&soname);
    assert!(
        link.exists(),
        "{} missing: capi/build.rs links it to libdistill_kernels.so (a copied library needs \
         `ln -s libdistill_kernels.so {soname}` beside it)",
        link.display()
    );
}

#[test]
fn header_version_matches_crate() {
    let define = header_define;
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(define("DK_VERSION_STRING"), version);
    let numeric = format!(
        "{}.{}.{}",
        define("DK_VERSION_MAJOR"),
        define("DK_VERSION_MINOR"),
        define("DK_VERSION_PATCH")
    );
    assert_eq!(numeric, version);
    assert_eq!(distill_kernels::VERSION, version);
    // dk_version() itself: capi/src/tests/mod.rs.
}

#[test]
fn comment_stripping_and_parsing() {
    let h = "/* dk_fake(void) */ int dk_a(int x); // dk_b(\nint dk_c (void);\ntypedef int dk_t;";
    let f = header_functions(h);
    assert_eq!(f, ["dk_a", "dk_c"].iter().map(|s| s.to_string()).collect());
}
