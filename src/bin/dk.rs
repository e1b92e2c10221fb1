//! `dk`: the command-line face of distill-kernels.
//!
//! - `dk info`: version, backends found (or why not), compiled GPU architectures, nvcc version.
//! - `dk bench`: the divergence on the best backend present over model-realistic vocabularies,
//!   checked against the f64 reference, and MoE dispatch (route, permute, combine, forward and
//!   backward) for the shapes of ANCHORS.md, checked against the CPU backend; both reported as
//!   fractions of the copy-bandwidth floor; and grouped-query attention (forward, forward +
//!   backward) in FLOP/s, checked against an f64 computation on sampled rows.
//!
//! Argument parsing is std only (no dependencies beyond the library's).

/// Writes to stdout; a closed pipe (`dk bench | head`) ends the program quietly instead of
/// panicking as `print!` does.
fn emit(args: std::fmt::Arguments<'_>, newline: bool) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let r = out
        .write_fmt(args)
        .and_then(|()| {
            if newline {
                out.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        .and_then(|()| out.flush());
    if let Err(e) = r {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        eprintln!("dk: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

macro_rules! out {
    ($($arg:tt)*) => { $crate::emit(format_args!($($arg)*), false) };
}

macro_rules! outln {
    () => { $crate::emit(format_args!(""), true) };
    ($($arg:tt)*) => { $crate::emit(format_args!($($arg)*), true) };
}

#[path = "dk/attention.rs"]
mod attention;
#[path = "dk/backend.rs"]
mod backend;
#[path = "dk/bench.rs"]
mod bench;
#[path = "dk/cli.rs"]
mod cli;
#[path = "dk/data.rs"]
mod data;
#[path = "dk/fused.rs"]
mod fused;
#[path = "dk/info.rs"]
mod info;
#[path = "dk/l2_evict.rs"]
mod l2_evict;
#[path = "dk/moe.rs"]
mod moe;
#[path = "dk/reference.rs"]
mod reference;

const HELP: &str = "\
dk: fused kernels for LLM distillation (distill-kernels): KL / JSD divergence, MoE dispatch,
grouped-query attention

usage: dk <command> [options]

commands:
  info          version, backends found (CPU; CUDA devices or why not), compiled GPU
                architectures, the nvcc that built the kernels
  bench         the divergence, MoE dispatch (route, permute, combine, forward and
                backward), attention (forward, forward + backward) and the fused linear JSD
                on the best backend present, every result checked (the f64 reference, the
                CPU backend), timed, and reported against the copy-bandwidth floor
                (attention: in FLOP/s; fused: against its four GEMMs)
  help [cmd]    this help, or the help of a command

options:
  -h, --help    this help
  -V, --version print the version

examples:
  dk info
  dk bench --quick
  dk bench --device cuda --dtype bf16 --vocab 151936 --kinds jsd --json bench.json
  dk bench --ops moe --moe-shapes qwen3 --json moe.json
  dk bench attention --device cuda --json attention.json
";

const INFO_HELP: &str = "\
dk info: version, backends found (CPU; CUDA devices with name and compute capability, or why
not: no driver, no device, no kernels compiled), compiled GPU architectures, nvcc version

usage: dk info
";

fn help_for(cmd: Option<&str>) -> i32 {
    match cmd {
        None => {
            out!("{HELP}");
            0
        }
        Some("bench") => {
            out!("{}", bench::HELP);
            0
        }
        Some("info") => {
            out!("{INFO_HELP}");
            0
        }
        Some("help") => {
            out!("{HELP}");
            0
        }
        Some(other) => {
            eprintln!("dk: error: no command '{other}' (commands: info, bench, help)");
            2
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        None => {
            eprint!("{HELP}");
            2
        }
        Some(flag @ ("-h" | "--help" | "-V" | "--version")) if args.len() > 1 => {
            eprintln!(
                "dk: error: unexpected argument '{}' after {flag} (for a command's help: 'dk help <command>')",
                args[1]
            );
            2
        }
        Some("-h" | "--help") => help_for(None),
        Some("-V" | "--version") => {
            outln!("dk {}", distill_kernels::VERSION);
            0
        }
        Some("help") => {
            if args.len() > 2 {
                eprintln!("dk: error: 'dk help' takes at most one command");
                2
            } else {
                help_for(args.get(1).map(String::as_str))
            }
        }
        Some("info") => match &args[1..] {
            [] => info::run(),
            [h] if h == "-h" || h == "--help" => help_for(Some("info")),
            [other, ..] => {
                eprintln!("dk info: error: unexpected argument '{other}' (see 'dk help info')");
                2
            }
        },
        Some("bench") => bench::run(&args[1..]),
        Some(other) if other.starts_with('-') => {
            eprintln!(
                "dk: error: unknown option '{other}' (before a command only --help and --version; \
                 see 'dk --help')"
            );
            2
        }
        Some(other) => {
            eprintln!("dk: error: unknown command '{other}' (commands: info, bench, help; see 'dk --help')");
            2
        }
    };
    std::process::exit(code);
}
