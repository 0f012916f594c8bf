//! `sparkinfer compile`: every kernel instantiation for each named architecture, with the resources
//! ptxas reports. Fails on a compile error, a spill, or static shared memory over the sm_120 limit. With
//! `--cubins DIR`, each module's cubin goes to DIR/ARCH/NAME.cubin and its kernels' name expressions and
//! lowered names, a tab apart, to DIR/ARCH/NAME.names (NAME: the source's short name, `KernelSource::name`).

use crate::Options;
use sparkinfer::runtime::jit;

/// Shared memory a block may use on sm_120 / sm_121 (RTX 5090, RTX PRO 6000, DGX Spark).
const SHARED_LIMIT_BYTES: u32 = 99 * 1024;

pub fn run(o: &Options) -> Result<(), String> {
    let mut failures = Vec::new();
    println!(
        "{:<8} {:<48} {:>5} {:>8} {:>6} {:>7} {:>7}",
        "arch", "kernel", "regs", "smem", "stack", "spill-s", "spill-l"
    );
    for arch in &o.archs {
        for source in sparkinfer::ops::all_kernel_sources() {
            let exprs = (source.instantiations)();
            let started = std::time::Instant::now();
            let module = match jit::compile(source, &exprs, arch, true) {
                Ok(m) => m,
                Err(e) => {
                    println!("{arch:<8} {:<48} COMPILE ERROR", source.path);
                    failures.push(format!("{arch} {}: {}", source.path, e.message));
                    continue;
                }
            };
            if let Some(dir) = &o.cubins {
                if let Err(e) = write_cubin(dir, arch, source.name, &module) {
                    failures.push(format!("{arch} {}: {e}", source.path));
                }
            }
            let resources = jit::parse_ptxas_log(&module.log);
            for (expr, lowered) in &module.lowered_names {
                let Some(r) = resources.iter().find(|r| &r.lowered_name == lowered) else {
                    failures.push(format!("{arch} {expr}: no ptxas report for {lowered}"));
                    continue;
                };
                let spills = r.spill_store_bytes + r.spill_load_bytes;
                let mut flag = "";
                if spills > 0 {
                    flag = "  SPILL";
                    failures.push(format!(
                        "{arch} {expr}: spills {} bytes stored, {} loaded",
                        r.spill_store_bytes, r.spill_load_bytes
                    ));
                }
                if r.shared_bytes > SHARED_LIMIT_BYTES {
                    flag = "  SHARED>99KiB";
                    failures.push(format!("{arch} {expr}: {} bytes of static shared memory", r.shared_bytes));
                }
                println!(
                    "{arch:<8} {expr:<48} {:>5} {:>8} {:>6} {:>7} {:>7}{flag}",
                    r.registers, r.shared_bytes, r.stack_bytes, r.spill_store_bytes, r.spill_load_bytes
                );
            }
            eprintln!("  {arch} {}: {} kernels in {:.1} s", source.path, exprs.len(), started.elapsed().as_secs_f64());
        }
    }
    if failures.is_empty() {
        println!("all kernels compiled for {} without spills", o.archs.join(", "));
        Ok(())
    } else {
        Err(format!("{} problem(s):\n  {}", failures.len(), failures.join("\n  ")))
    }
}

/// Writes `module`'s cubin and kernel names under `dir`/`arch` (see the module docs).
fn write_cubin(dir: &str, arch: &str, name: &str, module: &jit::CompiledModule) -> std::io::Result<()> {
    let folder = std::path::Path::new(dir).join(arch);
    std::fs::create_dir_all(&folder)?;
    std::fs::write(folder.join(format!("{name}.cubin")), &module.cubin)?;
    let names: String = module.lowered_names.iter().map(|(expr, lowered)| format!("{expr}\t{lowered}\n")).collect();
    std::fs::write(folder.join(format!("{name}.names")), names)
}
