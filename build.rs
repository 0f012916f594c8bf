//! Kernel sources are embedded with include_str!, which cargo already tracks; a change anywhere under
//! csrc/ (a new header included by a kernel, say) also rebuilds the library.
fn main() {
    // The C example test compiles C with the `cc` crate, which wants the target triple.
    println!("cargo:rustc-env=SPARKINFER_TEST_TARGET={}", std::env::var("TARGET").unwrap());
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo:rerun-if-changed=build.rs");
}
