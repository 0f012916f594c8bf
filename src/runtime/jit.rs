//! NVRTC: CUDA C++ source to a cubin for one exact architecture.

use super::libs;
use super::sources::{KernelSource, HEADERS};
use crate::error::{Error, Result, Status};
use cudarc::nvrtc::sys as nvrtc;
use std::ffi::{c_char, CStr, CString};

/// A compiled module: the cubin and the mangled name of each requested template instantiation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledModule {
    pub cubin: Vec<u8>,
    /// (name expression, lowered name) pairs, in request order.
    pub lowered_names: Vec<(String, String)>,
    /// The compiler's log (ptxas resource usage when requested).
    pub log: String,
}

/// Compiler options for an architecture such as `sm_120`. Part of the cache key.
pub fn options(arch: &str, ptxas_verbose: bool) -> Vec<String> {
    let mut opts =
        vec![format!("--gpu-architecture={arch}"), "--std=c++17".to_string(), "-DSPARKINFER_JIT=1".to_string()];
    if ptxas_verbose {
        opts.push("--ptxas-options=-v".to_string());
    }
    opts
}

fn check(rc: nvrtc::nvrtcResult, what: &str) -> Result<()> {
    if rc == nvrtc::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        let text = unsafe { CStr::from_ptr(nvrtc::nvrtcGetErrorString(rc)) }.to_string_lossy().into_owned();
        Err(Error::new(Status::CompileError, format!("{what} failed: {text}")))
    }
}

struct Program(nvrtc::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        unsafe {
            nvrtc::nvrtcDestroyProgram(&mut self.0);
        }
    }
}

fn program_log(prog: &Program) -> String {
    let mut size = 0usize;
    if unsafe { nvrtc::nvrtcGetProgramLogSize(prog.0, &mut size) } != nvrtc::nvrtcResult::NVRTC_SUCCESS || size == 0 {
        return String::new();
    }
    let mut buf = vec![0u8; size];
    unsafe { nvrtc::nvrtcGetProgramLog(prog.0, buf.as_mut_ptr() as *mut c_char) };
    String::from_utf8_lossy(&buf).trim_end_matches('\0').trim().to_string()
}

fn cstring(s: &str, what: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::internal(format!("{what} contains a NUL byte")))
}

/// Compiles `source` for `arch`, instantiating each of `name_exprs`.
pub fn compile(
    source: &KernelSource,
    name_exprs: &[String],
    arch: &str,
    ptxas_verbose: bool,
) -> Result<CompiledModule> {
    libs::require_nvrtc()?;
    let code = cstring(source.code, source.path)?;
    let file_name = cstring(source.path, source.path)?;
    let header_texts: Vec<CString> = HEADERS.iter().map(|(_, t)| cstring(t, "header")).collect::<Result<_>>()?;
    let header_names: Vec<CString> = HEADERS.iter().map(|(n, _)| cstring(n, "header name")).collect::<Result<_>>()?;
    let header_text_ptrs: Vec<*const c_char> = header_texts.iter().map(|s| s.as_ptr()).collect();
    let header_name_ptrs: Vec<*const c_char> = header_names.iter().map(|s| s.as_ptr()).collect();

    let mut raw = std::ptr::null_mut();
    check(
        unsafe {
            nvrtc::nvrtcCreateProgram(
                &mut raw,
                code.as_ptr(),
                file_name.as_ptr(),
                HEADERS.len() as i32,
                header_text_ptrs.as_ptr(),
                header_name_ptrs.as_ptr(),
            )
        },
        "nvrtcCreateProgram",
    )?;
    let prog = Program(raw);

    let exprs: Vec<CString> = name_exprs.iter().map(|e| cstring(e, "name expression")).collect::<Result<_>>()?;
    for e in &exprs {
        check(unsafe { nvrtc::nvrtcAddNameExpression(prog.0, e.as_ptr()) }, "nvrtcAddNameExpression")?;
    }

    let opts: Vec<CString> =
        options(arch, ptxas_verbose).iter().map(|o| cstring(o, "option")).collect::<Result<_>>()?;
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let rc = unsafe { nvrtc::nvrtcCompileProgram(prog.0, opt_ptrs.len() as i32, opt_ptrs.as_ptr()) };
    let log = program_log(&prog);
    if rc != nvrtc::nvrtcResult::NVRTC_SUCCESS {
        let kind = if rc == nvrtc::nvrtcResult::NVRTC_ERROR_INVALID_OPTION {
            format!("NVRTC rejected the options for {arch} (is this NVRTC too old for it?)")
        } else {
            format!("{} failed to compile for {arch}", source.path)
        };
        return Err(Error::new(Status::CompileError, format!("{kind}: {log}")));
    }

    let mut lowered_names = Vec::with_capacity(exprs.len());
    for (e, name) in exprs.iter().zip(name_exprs) {
        let mut lowered: *const c_char = std::ptr::null();
        check(unsafe { nvrtc::nvrtcGetLoweredName(prog.0, e.as_ptr(), &mut lowered) }, "nvrtcGetLoweredName")?;
        let lowered = unsafe { CStr::from_ptr(lowered) }.to_string_lossy().into_owned();
        lowered_names.push((name.clone(), lowered));
    }

    let mut size = 0usize;
    check(unsafe { nvrtc::nvrtcGetCUBINSize(prog.0, &mut size) }, "nvrtcGetCUBINSize")?;
    let mut cubin = vec![0u8; size];
    check(unsafe { nvrtc::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr() as *mut c_char) }, "nvrtcGetCUBIN")?;
    Ok(CompiledModule { cubin, lowered_names, log })
}

/// Resource usage of one kernel, read from ptxas' verbose log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelResources {
    pub lowered_name: String,
    pub registers: u32,
    pub shared_bytes: u32,
    pub stack_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
}

fn number_before(line: &str, unit: &str) -> Option<u32> {
    let idx = line.find(unit)?;
    line[..idx].split_whitespace().last()?.parse().ok()
}

/// Parses `ptxas info : Function properties for NAME` / `Used N registers, ... N bytes smem` blocks.
pub fn parse_ptxas_log(log: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    let mut current: Option<KernelResources> = None;
    for line in log.lines() {
        if let Some(idx) = line.find("Function properties for ") {
            if let Some(k) = current.take() {
                out.push(k);
            }
            let name = line[idx + "Function properties for ".len()..].trim().to_string();
            current = Some(KernelResources { lowered_name: name, ..Default::default() });
        } else if let Some(k) = current.as_mut() {
            if line.contains("stack frame") {
                k.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
                k.spill_store_bytes = number_before(line, "bytes spill stores").unwrap_or(0);
                k.spill_load_bytes = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                k.registers = number_before(line, "registers").unwrap_or(0);
                k.shared_bytes = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    if let Some(k) = current.take() {
        out.push(k);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_resource_lines() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function '_Z3fooi' for 'sm_120'\n\
ptxas info    : Function properties for _Z3fooi\n\
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n\
ptxas info    : Used 40 registers, used 1 barriers, 128 bytes smem, 380 bytes cmem[0]\n\
ptxas info    : Function properties for _Z3bari\n\
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 12 registers, used 0 barriers, 380 bytes cmem[0]\n";
        let r = parse_ptxas_log(log);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            KernelResources {
                lowered_name: "_Z3fooi".into(),
                registers: 40,
                shared_bytes: 128,
                stack_bytes: 16,
                spill_store_bytes: 8,
                spill_load_bytes: 4
            }
        );
        assert_eq!(r[1].registers, 12);
        assert_eq!(r[1].shared_bytes, 0);
        assert_eq!(r[1].spill_store_bytes, 0);
    }
}
