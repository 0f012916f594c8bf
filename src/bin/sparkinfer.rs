//! `sparkinfer`: information, ahead-of-time compile checks, correctness checks and benchmarks.
//!
//! ```text
//! sparkinfer info
//! sparkinfer compile [--arch sm_90,sm_100,sm_110,sm_120,sm_121] [--cubins DIR]
//! sparkinfer check   [--device N | --cpu] [--seed S]
//! sparkinfer bench   [--device N | --cpu] [--json FILE] [--quick]
//! ```

#[path = "sparkinfer/bench.rs"]
mod bench;
#[path = "sparkinfer/check.rs"]
mod check;
#[path = "sparkinfer/compile.rs"]
mod compile;
#[path = "sparkinfer/info.rs"]
mod info;

use std::process::ExitCode;

const USAGE: &str = "usage: sparkinfer <command> [options]

commands:
  info                      driver, NVRTC, devices and cache folder
  compile [--arch LIST] [--cubins DIR]
                            compile every kernel for the listed archs (default sm_90,sm_100,sm_110,sm_120,sm_121)
                            and report registers, shared memory and spills; fails on a compile error or spill;
                            with --cubins, also writes each module's cubin and kernel names under DIR/ARCH/
                            (bench/compare_cubins.py compares two such folders)
  check [--device N|--cpu] [--seed S]
                            run every op against the reference on random inputs at the model shapes
                            (on the GPU when there is one, else on the CPU backend)
  bench [--device N|--cpu] [--json FILE] [--quick] [--only foundation,attention,moe]
                            time every op at the model shapes (GPU: CUDA events, median of many runs);
                            with SPARKINFER_PROFILE set, one extra lone launch per row runs between
                            cuProfilerStart/Stop (for `ncu --profile-from-start off`)";

/// Command-line options shared by the subcommands.
pub struct Options {
    pub device: Option<i32>,
    pub cpu: bool,
    pub seed: Option<u64>,
    pub json: Option<String>,
    pub archs: Vec<String>,
    pub quick: bool,
    /// Benchmark families to run (empty: all).
    pub only: Vec<String>,
    /// `compile`: the folder the cubins are written to.
    pub cubins: Option<String>,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        device: None,
        cpu: false,
        seed: None,
        json: None,
        archs: ["sm_90", "sm_100", "sm_110", "sm_120", "sm_121"].iter().map(|s| s.to_string()).collect(),
        quick: false,
        only: Vec::new(),
        cubins: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--device" => o.device = Some(value("--device")?.parse().map_err(|e| format!("--device: {e}"))?),
            "--cpu" => o.cpu = true,
            "--seed" => o.seed = Some(value("--seed")?.parse().map_err(|e| format!("--seed: {e}"))?),
            "--json" => o.json = Some(value("--json")?),
            "--arch" => {
                o.archs = value("--arch")?.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
            }
            "--quick" => o.quick = true,
            "--cubins" => o.cubins = Some(value("--cubins")?),
            "--only" => {
                o.only = value("--only")?.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(o)
}

/// The context a command runs on: the named device, the CPU when asked, else device 0 when a GPU is
/// usable and the CPU backend otherwise (saying why).
pub fn open_context(o: &Options) -> Result<sparkinfer::Context, String> {
    if o.cpu {
        return sparkinfer::Context::new(sparkinfer::ops::DEVICE_CPU).map_err(|e| e.to_string());
    }
    if let Some(d) = o.device {
        return sparkinfer::Context::new(d).map_err(|e| e.to_string());
    }
    match sparkinfer::runtime::device::device_count() {
        Ok(n) if n > 0 => sparkinfer::Context::new(0).map_err(|e| e.to_string()),
        Ok(_) => {
            eprintln!("no CUDA device: using the CPU backend");
            sparkinfer::Context::new(sparkinfer::ops::DEVICE_CPU).map_err(|e| e.to_string())
        }
        Err(e) => {
            eprintln!("no usable CUDA driver ({e}): using the CPU backend");
            sparkinfer::Context::new(sparkinfer::ops::DEVICE_CPU).map_err(|e| e.to_string())
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(command) = args.first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    if command == "--help" || command == "-h" || command == "help" {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let options = match parse(&args[1..]) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("sparkinfer {command}: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match command.as_str() {
        "info" => info::run(&options),
        "compile" => compile::run(&options),
        "check" => check::run(&options),
        "bench" => bench::run(&options),
        other => Err(format!("unknown command {other}\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sparkinfer {command}: {e}");
            ExitCode::FAILURE
        }
    }
}
