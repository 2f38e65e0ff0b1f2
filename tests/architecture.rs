//! The shape of the code, checked: in every folder of `src/` (the crate root included) the
//! modules form no import cycle (each uses only modules below it), and no function in `src/` is
//! longer than 80 lines (a formula table may be, saying why).
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

/// A file's module path: `src/model/cpu_layer/mod.rs` → `[model, cpu_layer]`,
/// `src/model/kernels.rs` → `[model, kernels]`, `src/lib.rs` → `[]`.
fn module_of(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src()).unwrap();
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts
}

/// The leading identifiers of a path text (`a::b::C` → `[a, b, C]`).
fn segments(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    loop {
        let ident: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        if ident.is_empty() {
            break;
        }
        rest = &rest[ident.len()..];
        out.push(ident);
        match rest.strip_prefix("::") {
            Some(r) => rest = r,
            None => break,
        }
    }
    out
}

/// The absolute module paths a file's code names, through `crate::…` and `super::…`
/// (including `use` groups: `crate::{a, b::c}`).
fn references(file: &Path) -> Vec<Vec<String>> {
    let text = code(file);
    let here = module_of(file);
    let mut out = Vec::new();
    for (anchor, base) in [("crate::", Vec::new()), ("super::", here[..here.len().saturating_sub(1)].to_vec())] {
        let mut rest = text.as_str();
        while let Some(i) = rest.find(anchor) {
            let preceded = rest[..i].chars().last().is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
            rest = &rest[i + anchor.len()..];
            if preceded {
                continue; // `super::super::x` is read from its first `super::`; `dpo::crate::` is not a path
            }
            let mut base = base.clone();
            while let Some(r) = rest.strip_prefix("super::") {
                base.pop();
                rest = r;
            }
            let items: Vec<&str> = match rest.strip_prefix('{') {
                Some(group) => group[..group.find('}').unwrap_or(group.len())].split(',').collect(),
                None => vec![rest],
            };
            for item in items {
                out.push([base.clone(), segments(item.trim())].concat());
            }
        }
    }
    out
}

/// For the folder module `folder`: each child module → the sibling modules its files name.
fn folder_graph(folder: &[String]) -> BTreeMap<String, BTreeSet<String>> {
    let dir = folder.iter().fold(src(), |d, p| d.join(p));
    let mut files = Vec::new();
    rust_files(&dir, &mut files);
    let children: BTreeSet<String> = files
        .iter()
        .map(|f| module_of(f))
        .filter(|m| m.len() > folder.len() && m[..folder.len()] == *folder)
        .map(|m| m[folder.len()].clone())
        .filter(|c| c != "main")
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = children.iter().map(|c| (c.clone(), BTreeSet::new())).collect();
    for f in &files {
        let m = module_of(f);
        let Some(child) = m.get(folder.len()).filter(|_| m[..folder.len()] == *folder) else { continue };
        for r in references(f) {
            if r.len() > folder.len() && r[..folder.len()] == *folder {
                let target = &r[folder.len()];
                if target != child && children.contains(target) {
                    graph.get_mut(child).unwrap().insert(target.clone());
                }
            }
        }
    }
    graph
}

/// Every folder module under src/ (the crate root included).
fn folders() -> Vec<Vec<String>> {
    let mut out = vec![Vec::new()];
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    for f in files.iter().filter(|f| f.file_name().is_some_and(|n| n == "mod.rs")) {
        out.push(module_of(f));
    }
    out
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
fn no_folder_of_src_has_an_import_cycle_among_its_files() {
    let top = folder_graph(&[]);
    assert!(top.len() > 10 && top["train"].contains("model"), "the module scan sees the code: {top:?}");
    let model = folder_graph(&["model".to_string()]);
    assert!(model["causal_lm"].contains("layer") && model["cpu_layer"].contains("kernels"), "{model:?}");
    let mut cycles = Vec::new();
    for folder in folders() {
        let graph = folder_graph(&folder);
        let at = if folder.is_empty() { "src".to_string() } else { format!("src/{}", folder.join("/")) };
        cycles.extend(graph.keys().filter_map(|m| cycle_from(&graph, m)).map(|c| format!("{at}: {}", c.join(" → "))));
    }
    assert!(cycles.is_empty(), "import cycles among the files of a folder:\n{}", cycles.join("\n"));
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

/// Functions allowed past 80 lines, with the reason.
const LONG_BY_DESIGN: [(&str, &str); 1] =
    [("terms::term", "one match arm per loss, each its paper's formula: a table, read arm by arm")];

#[test]
fn no_function_in_src_is_over_80_lines() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut all = Vec::new();
    for f in &files {
        let stem = f.file_stem().unwrap().to_string_lossy().into_owned();
        all.extend(function_lengths(f).into_iter().map(|(n, l)| (format!("{stem}::{n}"), l)));
    }
    assert!(all.iter().any(|(n, l)| n == "terms::term" && *l > 80), "the scan sees the functions: {all:?}");
    let long: Vec<String> = all
        .iter()
        .filter(|(n, l)| *l > 80 && !LONG_BY_DESIGN.iter().any(|(exempt, _)| exempt == n))
        .map(|(n, l)| format!("{n}: {l} lines"))
        .collect();
    assert!(long.is_empty(), "functions over 80 lines in src/:\n{}", long.join("\n"));
}
