//! Guard rails on the crate's layout, checked on its source files:
//! - no import cycle between files: no file refers (`use`, or a `crate::`/`super::` path)
//!   to a file that refers back to it, directly or through others. A module's `mod.rs`
//!   naming its own children (`mod x; pub use x::Y;`) is how Rust lays a module out and
//!   does not count as an import;
//! - `unsafe` appears only in the files the design allows it in.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");

/// The files allowed `unsafe` code (the crate root denies it everywhere else).
const UNSAFE_ALLOWED: &[&str] = &[
    "dev/buf.rs",
    "dev/engine.rs",
    "dev/ioctl.rs",
    "alloc/shm.rs",
    "alloc/shm_lock.rs",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a file: `alloc/node.rs` -> ["alloc", "node"], `alloc/mod.rs` ->
/// ["alloc"], `lib.rs` -> [].
fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

/// Source without comments (line comments and doc comments), so paths in prose do not count.
fn code_of(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every `crate::a::b` or `super::a` path (and the names inside `use x::{a, b}` groups one
/// level deep), as absolute module paths relative to `me`.
fn referenced_paths(code: &str, me: &[String], is_mod_file: bool) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let rest: String = bytes[i..bytes.len().min(i + 7)].iter().collect();
        let start_ok = i == 0
            || !(bytes[i - 1].is_alphanumeric() || bytes[i - 1] == '_' || bytes[i - 1] == ':');
        if start_ok && (rest.starts_with("crate::") || rest.starts_with("super::")) {
            let mut j = i;
            while j < bytes.len()
                && (bytes[j].is_alphanumeric() || bytes[j] == '_' || bytes[j] == ':')
            {
                j += 1;
            }
            let path: String = bytes[i..j].iter().collect();
            let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
            // The module a file's `super` names: its parent module (for mod.rs, the parent
            // of the module it defines).
            let mut base: Vec<String> = if segs[0] == "crate" {
                Vec::new()
            } else {
                let mut b = me.to_vec();
                if !is_mod_file || !b.is_empty() {
                    b.pop();
                }
                b
            };
            let mut k = 1;
            while k < segs.len() && segs[k] == "super" {
                base.pop();
                k += 1;
            }
            let mut abs = base;
            abs.extend(segs[k..].iter().map(|s| s.to_string()));
            // A `{a, b}` group right after the path: each name is a path of its own.
            if j + 1 < bytes.len() && bytes[j] == '{' {
                let end = bytes[j..]
                    .iter()
                    .position(|&c| c == '}')
                    .map(|p| j + p)
                    .unwrap_or(j);
                let group: String = bytes[j + 1..end].iter().collect();
                for name in group.split(',') {
                    let name = name.split_whitespace().next().unwrap_or("");
                    let mut p = abs.clone();
                    p.extend(
                        name.split("::")
                            .filter(|s| !s.is_empty() && *s != "self")
                            .map(String::from),
                    );
                    out.push(p);
                }
            }
            out.push(abs);
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// The import cycles between the files under `root`, one line each.
fn import_cycles(root: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(root, &mut files);
    let modules: BTreeMap<Vec<String>, PathBuf> = files
        .iter()
        .map(|f| (module_of(f.strip_prefix(root).unwrap()), f.clone()))
        .collect();
    // The file a path lands in: the longest module prefix that is a file.
    let file_of = |p: &[String]| -> Option<Vec<String>> {
        (0..=p.len())
            .rev()
            .map(|n| p[..n].to_vec())
            .find(|m| modules.contains_key(m))
    };
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (m, f) in &modules {
        let is_mod_file = f
            .file_name()
            .is_some_and(|n| n == "mod.rs" || n == "lib.rs");
        let code = code_of(&std::fs::read_to_string(f).unwrap());
        for p in referenced_paths(&code, m, is_mod_file) {
            let Some(target) = file_of(&p) else { continue };
            // Not an import: the file itself, or a mod.rs naming its own descendants.
            let own_child = is_mod_file && target.starts_with(m);
            if target != *m && !own_child {
                edges.entry(m.clone()).or_default().insert(target);
            }
        }
    }
    // A cycle is a file that reaches itself.
    let mut cycles = Vec::new();
    for start in modules.keys() {
        let mut stack = vec![(start.clone(), vec![start.join("::")])];
        let mut seen = BTreeSet::new();
        while let Some((m, trail)) = stack.pop() {
            for next in edges.get(&m).into_iter().flatten() {
                if next == start {
                    cycles.push(format!("{} -> {}", trail.join(" -> "), start.join("::")));
                } else if seen.insert(next.clone()) {
                    let mut t = trail.clone();
                    t.push(next.join("::"));
                    stack.push((next.clone(), t));
                }
            }
        }
    }
    cycles
}

#[test]
fn no_import_cycle_between_files() {
    let cycles = import_cycles(Path::new(SRC));
    assert!(
        cycles.is_empty(),
        "import cycles between files:\n{}",
        cycles.join("\n")
    );
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    std::fs::create_dir(&a).unwrap();
    std::fs::write(dir.path().join("lib.rs"), "pub mod a;\n").unwrap();
    std::fs::write(a.join("mod.rs"), "pub mod x;\npub mod y;\npub use x::X;\n").unwrap();
    std::fs::write(a.join("x.rs"), "use super::y::Y;\npub struct X(Y);\n").unwrap();
    std::fs::write(
        a.join("y.rs"),
        "pub struct Y;\npub fn f(_: &crate::a::x::X) {}\n",
    )
    .unwrap();
    let cycles = import_cycles(dir.path());
    assert!(
        cycles.iter().any(|c| c.contains("a::x -> a::y")),
        "{cycles:?}"
    );
    // Without the reference back, no cycle (mod.rs naming its children is not one).
    std::fs::write(a.join("y.rs"), "pub struct Y;\n").unwrap();
    assert!(import_cycles(dir.path()).is_empty());
}

#[test]
fn unsafe_only_where_the_design_allows_it() {
    let root = Path::new(SRC);
    let mut files = Vec::new();
    rust_files(root, &mut files);
    let mut offenders = Vec::new();
    for f in files {
        let rel = f.strip_prefix(root).unwrap().to_string_lossy().to_string();
        let code = code_of(&std::fs::read_to_string(&f).unwrap());
        let uses_unsafe = code.lines().any(|l| {
            let l = l.trim_start();
            l.contains("unsafe {") || l.contains("unsafe fn") || l.contains("unsafe impl")
        });
        if uses_unsafe && !UNSAFE_ALLOWED.contains(&rel.as_str()) {
            offenders.push(rel);
        }
    }
    assert!(
        offenders.is_empty(),
        "unsafe outside its modules: {offenders:?}"
    );
}
