//! The shape of the code, checked: `src/`'s top-level modules form no import cycle (each uses
//! only modules below it), and no function in `src/train/` is longer than 80 lines.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without its comments (doc examples and links do not make dependencies).
fn code(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Top-level module → the top-level modules its code names (`crate::x`, `use crate::{x, ...}`).
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph = BTreeMap::new();
    for entry in std::fs::read_dir(src()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if name == "lib" || name == "main" {
            continue;
        }
        let mut files = Vec::new();
        if path.is_dir() {
            rust_files(&path, &mut files)
        } else {
            files.push(path.clone())
        }
        let mut deps = BTreeSet::new();
        for f in files {
            let text = code(&f);
            let mut rest = text.as_str();
            while let Some(i) = rest.find("crate::") {
                rest = &rest[i + 7..];
                if let Some(group) = rest.strip_prefix('{') {
                    let end = group.find('}').unwrap_or(group.len());
                    deps.extend(group[..end].split(',').map(|p| p.trim().split("::").next().unwrap_or("").to_string()));
                } else {
                    deps.insert(rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>());
                }
            }
        }
        deps.retain(|d| !d.is_empty() && *d != name && d != "self");
        graph.insert(name, deps);
    }
    graph
}

/// A cycle through `start`, if there is one.
fn cycle_from(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    fn walk(
        graph: &BTreeMap<String, BTreeSet<String>>,
        at: &str,
        start: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in graph.get(at).into_iter().flatten() {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(graph, next, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    walk(graph, start, start, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[test]
fn top_level_modules_form_no_import_cycle() {
    let graph = module_graph();
    assert!(graph.len() > 10 && graph["train"].contains("model"), "the module scan sees the code: {graph:?}");
    let cycles: Vec<String> = graph.keys().filter_map(|m| cycle_from(&graph, m)).map(|c| c.join(" → ")).collect();
    assert!(cycles.is_empty(), "import cycles among src/'s top-level modules:\n{}", cycles.join("\n"));
}

/// `(name, lines)` of every function in a file, from its `fn` line to its closing brace.
fn function_lengths(path: &Path) -> Vec<(String, usize)> {
    let text = code(path);
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        let Some(after) = ["fn ", "pub fn ", "pub(crate) fn ", "pub(super) fn ", "unsafe fn ", "pub unsafe fn "]
            .iter()
            .find_map(|p| t.strip_prefix(p))
        else {
            continue;
        };
        let name: String = after.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        let (mut depth, mut opened) = (0i32, false);
        for (j, l) in lines.iter().enumerate().skip(i) {
            for c in l.chars() {
                match c {
                    '{' => (depth, opened) = (depth + 1, true),
                    '}' => depth -= 1,
                    ';' if !opened && depth == 0 => break,
                    _ => {}
                }
            }
            if opened && depth == 0 {
                out.push((name.clone(), j - i + 1));
                break;
            }
            if !opened && l.trim_end().ends_with(';') {
                break;
            }
        }
    }
    out
}

#[test]
fn no_function_in_src_train_is_over_80_lines() {
    let mut files = Vec::new();
    rust_files(&src().join("train"), &mut files);
    let mut all = Vec::new();
    for f in &files {
        all.extend(
            function_lengths(f)
                .into_iter()
                .map(|(n, l)| (format!("{}::{n}", f.file_stem().unwrap().to_string_lossy()), l)),
        );
    }
    assert!(all.iter().any(|(n, _)| n.ends_with("::run")), "the scan sees the functions: {all:?}");
    let long: Vec<String> = all.iter().filter(|(_, l)| *l > 80).map(|(n, l)| format!("{n}: {l} lines")).collect();
    assert!(long.is_empty(), "functions over 80 lines in src/train/:\n{}", long.join("\n"));
}
