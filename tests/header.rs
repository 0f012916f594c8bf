//! The committed C header must be what cbindgen generates from src/capi now.

use std::path::Path;

#[test]
fn committed_header_is_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings =
        cbindgen::Builder::new().with_crate(root).with_config(config).generate().expect("cbindgen failed on src/capi");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let generated = String::from_utf8(generated).unwrap();
    for line in generated.lines().filter(|l| l.starts_with("#define ")) {
        let name = line.split_whitespace().nth(1).unwrap();
        assert!(name.starts_with("SPARKINFER_"), "the header exports {name}, which lacks the SPARKINFER_ prefix");
    }
    let version_line = format!("#define SPARKINFER_VERSION_STRING \"{}\"", env!("CARGO_PKG_VERSION"));
    assert!(generated.contains(&version_line), "cbindgen.toml's version string differs from Cargo.toml's");
    let path = root.join("include/sparkinfer/sparkinfer.h");
    if std::env::var_os("SPARKINFER_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/sparkinfer/sparkinfer.h is stale: regenerate it with `SPARKINFER_BLESS=1 cargo test --test header`"
    );
}
