//! The library's module graph, checked against the one ARCHITECTURE.md allows.
//!
//! ARCHITECTURE.md's "Allowed imports" table is the source of truth: each row names
//! a top-level module of `lib/src` and the modules it may import. These tests read
//! every `crate::` path in the code (comments left out, `use crate::{a, b::c}`
//! groups opened) and fail on an import the table does not allow, on a module the
//! table does not list, and on a cycle in the table itself.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Rows of the "Allowed imports" table: module → modules it may import.
fn allowed_graph(architecture: &str) -> BTreeMap<String, BTreeSet<String>> {
    let section = architecture.split("## Allowed imports").nth(1).expect("ARCHITECTURE.md has an `## Allowed imports` section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut graph = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let names = |cell: &str| -> Vec<String> {
            cell.split(',').filter_map(|s| s.trim().strip_prefix('`')?.split('`').next().map(str::to_string)).collect()
        };
        let module = names(cells[0]).pop().expect("a module name in back-quotes");
        graph.insert(module, names(cells.get(1).copied().unwrap_or("")).into_iter().collect());
    }
    graph
}

/// The code of a Rust file without its comments (line and block comments; string
/// contents are kept, which is harmless for `crate::` paths).
fn strip_comments(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let b = src.as_bytes();
    let (mut i, mut in_str) = (0, false);
    while i < b.len() {
        if in_str {
            if b[i] == b'\\' {
                out.push_str(&src[i..(i + 2).min(b.len())]);
                i += 2;
                continue;
            }
            in_str = b[i] != b'"';
        } else if b[i] == b'"' && (i == 0 || b[i - 1] != b'\'') {
            in_str = true;
        } else if src[i..].starts_with("//") {
            i = src[i..].find('\n').map_or(b.len(), |n| i + n);
            continue;
        } else if src[i..].starts_with("/*") {
            i = src[i..].find("*/").map_or(b.len(), |n| i + n + 2);
            continue;
        }
        let c = src[i..].chars().next().unwrap();
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// The top-level modules a file's code names through `crate::` paths.
fn imported_modules(src: &str) -> BTreeSet<String> {
    let code = strip_comments(src);
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String { s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect() };
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            // `crate::{a, b::{c, d}, e}`: the first segment of each top-level item.
            let (mut depth, mut start) = (0usize, 0usize);
            for (k, ch) in group.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        found.insert(ident(group[start..k].trim()));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.insert(ident(group[start..k].trim()));
                        start = k + 1;
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(after));
        }
        rest = after;
    }
    found.retain(|m| !m.is_empty());
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every top-level module of `src` with its files (`x.rs`, `x/**.rs`).
fn modules(src: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut map: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for e in std::fs::read_dir(src).unwrap().flatten() {
        let p = e.path();
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        if p.is_dir() {
            rust_files(&p, map.entry(name).or_default());
        } else if p.extension().is_some_and(|x| x == "rs") && !["lib", "main", "module_graph"].contains(&name.as_str()) {
            map.entry(name).or_default().push(p);
        }
    }
    map
}

/// Imports that break the graph: `file: module imports X`.
fn violations(graph: &BTreeMap<String, BTreeSet<String>>, module: &str, file: &str, src: &str) -> Vec<String> {
    let roots: BTreeSet<&str> = ["VERSION", "info", "prelude"].into();
    let allowed = graph.get(module);
    imported_modules(src)
        .into_iter()
        .filter(|m| m != module && !roots.contains(m.as_str()) && !allowed.is_some_and(|a| a.contains(m)))
        .map(|m| format!("{file}: `{module}` imports `{m}`, which ARCHITECTURE.md's \"Allowed imports\" does not allow"))
        .collect()
}

fn architecture() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../ARCHITECTURE.md")).expect("ARCHITECTURE.md")
}

#[test]
fn every_import_between_modules_is_one_the_architecture_allows() {
    let graph = allowed_graph(&architecture());
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut problems = vec![];
    for (module, files) in modules(&src) {
        if !graph.contains_key(&module) {
            problems.push(format!("module `{module}` is missing from ARCHITECTURE.md's \"Allowed imports\" table"));
        }
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            let rel = f.strip_prefix(&src).unwrap().display().to_string();
            problems.extend(violations(&graph, &module, &rel, &text));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_allowed_module_graph_has_no_cycle() {
    let graph = allowed_graph(&architecture());
    assert!(graph.len() >= 10, "the table was not read: {graph:?}");
    // Kahn's algorithm: repeatedly remove modules that import nothing left.
    let mut left = graph.clone();
    while !left.is_empty() {
        let free: Vec<String> = left.iter().filter(|(_, deps)| deps.iter().all(|d| !left.contains_key(d))).map(|(m, _)| m.clone()).collect();
        assert!(!free.is_empty(), "the allowed imports form a cycle among {:?}", left.keys().collect::<Vec<_>>());
        for m in free {
            left.remove(&m);
        }
    }
    for stage in ["serve", "eval", "export"] {
        let deps = graph.get(stage).unwrap_or_else(|| panic!("the coming `{stage}` stage has a row"));
        assert!(!deps.contains("train"), "`{stage}` must not import `train`");
    }
}

#[test]
fn a_forbidden_import_is_reported_with_its_file_and_modules() {
    let graph = allowed_graph("## Allowed imports\n| module | may import |\n|---|---|\n| `track` | `mlflow`, `files` |\n| `train` | `track` |\n");
    let src = "//! Uses [`crate::train`] in a doc link only.\nuse crate::{files::write_atomic, mlflow::{MlflowClient, RunRef}};\nfn f() { crate::train::resolve(); let s = \"crate::data\"; }\n";
    let v = violations(&graph, "track", "track/x.rs", src);
    assert_eq!(v.len(), 2, "{v:?}");
    assert!(v[0].contains("track/x.rs") && v[0].contains("`track` imports `data`"), "{v:?}");
    assert!(v[1].contains("`track` imports `train`"), "{v:?}");
    assert!(violations(&graph, "track", "track/x.rs", "use crate::{files, mlflow::api::Run};").is_empty());
}
