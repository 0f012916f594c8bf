//! Builds every `examples_c/*.c` against the generated header and the freshly built library and runs it
//! (on the CPU backend where there is no GPU), and compiles the C++ wrappers in a C++17 translation unit.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository the examples and headers are read from: the one this test was built in, or, for a staged
/// copy of the test run where that path does not exist (bench/stage.sh, built in another checkout or on
/// another machine), the current directory.
fn root() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if built.join("examples_c").is_dir() {
        built
    } else {
        std::env::current_dir().unwrap()
    }
}

/// The folder of the libsparkinfer.so built with this test: `cargo test` leaves it in target/<profile>/deps
/// beside the test binary (it copies it up to target/<profile> only on `cargo build`); a staged copy of the
/// tests (bench/stage.sh) has it one folder up.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let here = exe.parent().unwrap();
    if here.join("libsparkinfer.so").exists() {
        here.to_path_buf()
    } else {
        here.parent().unwrap().to_path_buf()
    }
}

fn compiler(cpp: bool) -> Command {
    let mut build = cc::Build::new();
    build
        .cpp(cpp)
        .opt_level(1)
        .host(env!("SPARKINFER_TEST_TARGET"))
        .target(env!("SPARKINFER_TEST_TARGET"))
        .cargo_metadata(false);
    build.get_compiler().to_command()
}

fn build_and_run(source: &Path, out_dir: &Path) -> String {
    let exe = out_dir.join(source.file_stem().unwrap());
    let lib = lib_dir();
    assert!(lib.join("libsparkinfer.so").exists(), "libsparkinfer.so not found in {}", lib.display());
    let status = compiler(false)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&exe)
        .arg(source)
        .arg(format!("-I{}", root().join("include").display()))
        .arg(format!("-L{}", lib.display()))
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lsparkinfer", "-lm"])
        .status()
        .unwrap();
    assert!(status.success(), "compiling {} failed", source.display());
    // cargo puts target/<profile> first on LD_LIBRARY_PATH, which would win over the rpath and may hold
    // an older build of the library.
    let path = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    let out = Command::new(&exe).env("LD_LIBRARY_PATH", format!("{}:{path}", lib.display())).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{} failed:\n{text}", source.display());
    text
}

#[test]
fn c_examples_build_and_pass() {
    let out_dir = std::env::temp_dir().join(format!("sparkinfer-c-examples-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let mut examples: Vec<PathBuf> = std::fs::read_dir(root().join("examples_c"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "c"))
        .collect();
    examples.sort();
    assert!(examples.len() >= 2, "examples_c holds {} programs", examples.len());
    for ex in &examples {
        let text = build_and_run(ex, &out_dir);
        eprintln!("{}:\n{text}", ex.display());
    }
    std::fs::remove_dir_all(&out_dir).unwrap();
}

#[test]
fn cpp_wrappers_compile() {
    let out_dir = std::env::temp_dir().join(format!("sparkinfer-cpp-wrappers-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let mut tu = String::new();
    let mut headers: Vec<PathBuf> = std::fs::read_dir(root().join("include/sparkinfer/kernels"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "h"))
        .collect();
    headers.sort();
    for h in &headers {
        tu.push_str(&format!("#include <sparkinfer/kernels/{}>\n", h.file_name().unwrap().to_string_lossy()));
    }
    tu.push_str("int main() { return 0; }\n");
    let src = out_dir.join("wrappers.cpp");
    std::fs::write(&src, tu).unwrap();
    let status = compiler(true)
        .args(["-std=c++17", "-Wall", "-Wextra", "-Werror", "-c", "-o"])
        .arg(out_dir.join("wrappers.o"))
        .arg(&src)
        .arg(format!("-I{}", root().join("include").display()))
        .status()
        .unwrap();
    assert!(status.success(), "the C++ wrappers do not compile");
    std::fs::remove_dir_all(&out_dir).unwrap();
}
