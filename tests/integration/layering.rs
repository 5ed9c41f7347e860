//! The crate's top-level modules keep ARCHITECTURE.md's layering: every
//! `crate::MODULE` a module's non-test code names is an edge; each edge
//! goes to a lower layer, and the graph has no cycle.
//!
//! A source scan, not a compiler pass: it reads `use crate::{a, b::c}`
//! groups and `crate::a::…` paths, ignores comments and `#[cfg(test)] mod
//! tests` blocks. cargo-modules can draw this graph too, but builds
//! rust-analyzer (minutes of CI on two cores) for a question a scan answers.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `text` with comments, string and character literals blanked (newlines
/// kept), so nothing inside them reads as a path.
fn strip(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < chars.len() {
        let (c, next) = (chars[i], chars.get(i + 1).copied());
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r'
            && (next == Some('"') || next == Some('#'))
            && !chars[..i].last().is_some_and(|p| p.is_alphanumeric() || *p == '_')
        {
            // A raw string: r"...", r#"..."#.
            let hashes = chars[i + 1..].iter().take_while(|c| **c == '#').count();
            if chars.get(i + 1 + hashes) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let start = i;
            i += 2 + hashes;
            while i < chars.len()
                && !(chars[i] == '"' && chars[i + 1..].iter().take(hashes).filter(|c| **c == '#').count() == hashes)
            {
                i += 1;
            }
            i = (i + 1 + hashes).min(chars.len());
            out.extend(chars[start..i].iter().map(|c| blank(*c)));
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                let skip = if chars[i] == '\\' { 2 } else { 1 };
                for k in 0..skip {
                    if let Some(c) = chars.get(i + k) {
                        out.push(blank(*c));
                    }
                }
                i += skip;
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' && (next == Some('\\') || chars.get(i + 2) == Some(&'\'')) {
            // A character literal ('"', '\n'); a lifetime ('a) is left alone.
            let end = chars[i + 1..]
                .iter()
                .position(|c| *c == '\'')
                .map_or(chars.len(), |p| i + 2 + p);
            let end = if next == Some('\\') {
                chars[i + 3..]
                    .iter()
                    .position(|c| *c == '\'')
                    .map_or(chars.len(), |p| i + 4 + p)
            } else {
                end
            };
            out.extend(chars[i..end.min(chars.len())].iter().map(|c| blank(*c)));
            i = end;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// The code of `text` without comments and literals, and without its
/// `#[cfg(test)] mod NAME { ... }` modules (found by matching braces, so
/// code after one is still read).
fn code(text: &str) -> String {
    let mut code = strip(text);
    while let Some(at) = code.find("#[cfg(test)]") {
        let rest = &code[at + "#[cfg(test)]".len()..];
        let trimmed = rest.trim_start();
        if !trimmed.starts_with("mod ") {
            // Not a module: keep the item, drop only the attribute.
            code.replace_range(at..at + "#[cfg(test)]".len(), "");
            continue;
        }
        let Some(open) = code[at..].find('{').map(|p| at + p) else {
            break;
        };
        let mut depth = 0;
        let mut end = code.len();
        for (k, c) in code[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + k + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        code.replace_range(at..end, "");
    }
    code
}

/// Ways to name a module that the scan does not follow, refused instead.
fn unfollowed(code: &str) -> Option<&'static str> {
    ["super::super", "crate as ", "crate::self"]
        .into_iter()
        .find(|pattern| code.contains(pattern))
}

/// The top-level modules `code` names through `crate::`.
fn named_modules(code: &str) -> BTreeSet<String> {
    let mut named = BTreeSet::new();
    let ident = |s: &str| -> String { s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect() };
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::{c, d}, e}`: the first segment of each top-level item.
            let mut depth = 0;
            let mut at_item_start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => at_item_start = true,
                    c if at_item_start && !c.is_whitespace() => {
                        at_item_start = false;
                        named.insert(ident(&group[j..]));
                    }
                    _ => {}
                }
            }
        } else {
            named.insert(ident(rest));
        }
    }
    named.retain(|m| !m.is_empty());
    named
}

/// The edges between top-level modules of the crate in `src`.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    sources(src, &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(src).unwrap();
        let first = relative.iter().next().unwrap().to_string_lossy().into_owned();
        // The crate roots and the binaries are above every module.
        if matches!(first.as_str(), "lib.rs" | "main.rs" | "bin") {
            continue;
        }
        let module = first.trim_end_matches(".rs").to_owned();
        let text = std::fs::read_to_string(&file).unwrap();
        let code = code(&text);
        if let Some(pattern) = unfollowed(&code) {
            panic!(
                "{} names a module with `{pattern}`, which this check does not follow: use a crate:: path",
                file.display()
            );
        }
        let named = named_modules(&code);
        edges
            .entry(module.clone())
            .or_default()
            .extend(named.into_iter().filter(|m| *m != module));
    }
    edges
}

/// A cycle in `edges`, if there is one (depth-first search).
fn cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_owned());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, edges, done, path) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|node| visit(node, edges, &mut done, &mut Vec::new()))
}

#[test]
fn the_scan_reads_use_groups_and_paths() {
    let plain = code(
        "use crate::{\n    audit::{A, B},\n    boxapi::{C, d::E},\n    clock,\n};\nfn f() { crate::keys::x(); } // crate::policy\n#[cfg(test)]\nmod tests { use crate::service; }",
    );
    let named: Vec<String> = named_modules(&plain).into_iter().collect();
    assert_eq!(named, ["audit", "boxapi", "clock", "keys"]);
    // Paths after a URL in a string, after a '"' character, or after a
    // test module are still read; paths in comments and strings are not.
    let tricky = code(
        "const URL: &str = \"https://x\"; fn g() { crate::policy::f(); }\nconst Q: char = '\"'; fn h<'a>() { crate::cache::g(); }\n/* crate::metrics */ const S: &str = \"crate::service\";\n#[cfg(test)]\nmod tests { fn t() { crate::runtime::x(); } }\nfn after() { crate::rpc::y(); }",
    );
    let named: Vec<String> = named_modules(&tricky).into_iter().collect();
    assert_eq!(named, ["cache", "policy", "rpc"]);
    assert_eq!(unfollowed("use super::super::x;"), Some("super::super"));
    let mut edges = BTreeMap::new();
    edges.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    edges.insert("b".to_owned(), BTreeSet::from(["c".to_owned()]));
    edges.insert("c".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(
        cycle(&edges),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    edges.get_mut("c").unwrap().clear();
    assert_eq!(cycle(&edges), None);
}

/// ARCHITECTURE.md's layers, lowest first: a module may use only modules
/// of earlier layers.
const LAYERS: &[&[&str]] = &[
    &["clock", "fingerprint", "rpc", "duration", "process", "pb", "histogram"],
    &["boxapi", "auth"],
    &["keys", "cache", "policy", "fakebox"],
    &["error", "audit", "l2"],
    &["broker"],
    &["edge"],
    &["admin", "reload", "metrics"],
    &["service"],
    &["config"],
    &["runtime", "telemetry"],
    &["cli"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

#[test]
fn every_module_uses_only_lower_layers() {
    let edges = graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let mut upward = Vec::new();
    for (module, used) in &edges {
        let Some(own) = layer(module) else {
            panic!("module {module} is in no layer: add it to ARCHITECTURE.md's \"Layering\" and to LAYERS here");
        };
        for other in used {
            match layer(other) {
                Some(theirs) if theirs < own => {}
                _ => upward.push(format!("{module} -> {other}")),
            }
        }
    }
    assert!(
        upward.is_empty(),
        "these uses go up (or across) a layer (ARCHITECTURE.md, \"Layering\"): {}",
        upward.join(", ")
    );
}

#[test]
fn no_cycle_between_top_level_modules() {
    let edges = graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(edges.len() > 10, "the scan found the modules: {edges:?}");
    assert!(edges["broker"].contains("cache"), "and their edges: {edges:?}");
    if let Some(found) = cycle(&edges) {
        panic!(
            "the top-level modules form a cycle: {} (ARCHITECTURE.md, \"Layering\", says which way each may depend)",
            found.join(" -> ")
        );
    }
}
