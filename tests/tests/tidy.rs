//! Tidy checks of the workspace's own source, in rust-analyzer's manner: plain Rust reading the
//! files, run by `cargo test`. No cycle between the top-level modules of any crate's module tree
//! (STYLE.md, "Layout": modules depend one way), and no production file past
//! `MAX_PRODUCTION_LINES` lines of production code. Reads files only; starts no process.
//!
//! The module graph of a tree (a crate's `lib.rs`, its `main.rs`, each `src/bin/*.rs`: separate
//! trees) has one node per top-level module, a module's submodules counting as that module; an
//! edge `a -> b` is a `crate::b`, `crate::{b, ..}` or `super::..::b` path reaching the root from
//! non-test code of `a` (comments, string literals, `#[cfg(test)]` items and `tests.rs` /
//! `*_tests.rs` files are ignored).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Most lines of production code (the lines before a file's `#[cfg(test)]` test module) one file
/// may hold: past it, a file is split along its seams (STYLE.md, "Layout").
const MAX_PRODUCTION_LINES: usize = 1_000;

/// Reads a file of the tree being checked; `None` when it does not exist. The checks read the
/// disk; the unit tests below hand in files held in memory.
type Reader<'a> = &'a dyn Fn(&Path) -> Option<String>;

fn read_disk(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok()
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_path_buf()
}

/// The workspace's member crates, as listed in the root Cargo.toml's `members = [...]`.
fn members(root: &Path) -> Vec<String> {
    let toml = std::fs::read_to_string(root.join("Cargo.toml")).expect("root Cargo.toml");
    let start = toml.find("members").expect("a [workspace] members list");
    let list = &toml[start..];
    let list = &list[list.find('[').expect("members = [") + 1..list.find(']').expect("]")];
    let members: Vec<String> = list
        .split(',')
        .map(|m| m.trim().trim_matches('"').to_string())
        .filter(|m| !m.is_empty())
        .collect();
    assert!(!members.is_empty(), "no workspace members in Cargo.toml");
    members
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn blank(c: char) -> char {
    if c == '\n' { '\n' } else { ' ' }
}

/// `src` with comments removed and the contents of string and character literals blanked, every
/// newline kept (so line numbers still hold): braces, paths and attributes found afterwards are
/// code.
fn code_only(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let n = c.len();
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < n {
        let ch = c[i];
        if ch == '/' && at(i + 1) == '/' {
            while i < n && c[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if ch == '/' && at(i + 1) == '*' {
            // Block comments nest in Rust.
            let mut depth = 0usize;
            while i < n {
                if c[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
        } else if let Some(hashes) = raw_string_hashes(&c, i) {
            // r"..", r#".."#, br".." : no escapes, ends at `"` followed by as many `#`.
            let open = 1 + hashes + 1;
            out.extend(&c[i..i + open]);
            i += open;
            while i < n {
                if c[i] == '"' && (1..=hashes).all(|k| at(i + k) == '#') {
                    out.extend(&c[i..i + 1 + hashes]);
                    i += 1 + hashes;
                    break;
                }
                out.push(blank(c[i]));
                i += 1;
            }
        } else if ch == '"' {
            out.push('"');
            i += 1;
            while i < n {
                if c[i] == '\\' {
                    out.push(blank(c[i]));
                    out.push(blank(at(i + 1)));
                    i += 2;
                    continue;
                }
                if c[i] == '"' {
                    out.push('"');
                    i += 1;
                    break;
                }
                out.push(blank(c[i]));
                i += 1;
            }
        } else if ch == '\'' && at(i + 1) == '\\' {
            // An escaped character literal ('\n', '\'', '\u{7f}').
            out.push_str("'  ");
            i += 3;
            while i < n && c[i] != '\'' {
                out.push(blank(c[i]));
                i += 1;
            }
            out.push('\'');
            i += 1;
        } else if ch == '\'' && at(i + 2) == '\'' {
            out.push_str("' '");
            i += 3;
        } else {
            // Anything else, a lifetime's quote included.
            out.push(ch);
            i += 1;
        }
    }
    out
}

/// The number of `#` of a raw string literal starting at `i` (`r"`, `r#"`, `br"`), if one does.
fn raw_string_hashes(c: &[char], i: usize) -> Option<usize> {
    if c[i] != 'r' {
        return None;
    }
    let word_start = if i >= 1 && c[i - 1] == 'b' { i - 1 } else { i };
    if word_start >= 1 && is_ident(c[word_start - 1]) {
        return None;
    }
    let mut j = i + 1;
    while c.get(j) == Some(&'#') {
        j += 1;
    }
    (c.get(j) == Some(&'"')).then_some(j - i - 1)
}

/// `code` (from `code_only`) with every item carrying `#[cfg(test)]` blanked, from the attribute
/// through the item's `;` or its closing brace; newlines kept.
fn strip_test_items(code: &str) -> String {
    const ATTR: &str = "#[cfg(test)]";
    let mut c: Vec<char> = code.chars().collect();
    let attr: Vec<char> = ATTR.chars().collect();
    let mut i = 0;
    while i + attr.len() <= c.len() {
        if c[i..i + attr.len()] != attr[..] {
            i += 1;
            continue;
        }
        let mut j = i + attr.len();
        let mut depth = 0i64;
        let mut end = c.len();
        while j < c.len() {
            match c[j] {
                '(' | '[' => depth += 1,
                ')' | ']' => depth -= 1,
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = j + 1;
                        break;
                    }
                }
                ';' if depth == 0 => {
                    end = j + 1;
                    break;
                }
                _ => {}
            }
            j += 1;
        }
        for ch in &mut c[i..end] {
            *ch = blank(*ch);
        }
        i = end;
    }
    c.into_iter().collect()
}

/// A file's production code for the module graph: comments and literals out, test items out; a
/// file that is test code as a whole (`#![cfg(test)]`) has none.
fn production_code(src: &str) -> String {
    let code = code_only(src);
    if code.contains("#![cfg(test)]") {
        return String::new();
    }
    strip_test_items(&code)
}

/// The modules `code` declares with `mod name;` (out-of-line, so backed by a file), in order.
fn declared_mods(code: &str) -> Vec<String> {
    let words = words(code);
    let mut out = Vec::new();
    for (k, w) in words.iter().enumerate() {
        if w.text != "mod" {
            continue;
        }
        let Some(name) = words.get(k + 1) else {
            continue;
        };
        let after = code[name.end..].trim_start();
        if after.starts_with(';') && name.text != "tests" && !name.text.ends_with("_tests") {
            out.push(name.text.to_string());
        }
    }
    out
}

struct Word<'a> {
    text: &'a str,
    start: usize,
    end: usize,
}

/// The identifiers and keywords of `code`, with their byte ranges.
fn words(code: &str) -> Vec<Word<'_>> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, ch) in code.char_indices().chain([(code.len(), ' ')]) {
        match (start, is_ident(ch)) {
            (None, true) => start = Some(i),
            (Some(s), false) => {
                out.push(Word {
                    text: &code[s..i],
                    start: s,
                    end: i,
                });
                start = None;
            }
            _ => {}
        }
    }
    out
}

/// A file is test code by name: `tests.rs` or `*_tests.rs`.
fn is_test_file(p: &Path) -> bool {
    let name = p.file_stem().map(|s| s.to_string_lossy().to_string());
    name.is_some_and(|n| n == "tests" || n.ends_with("_tests"))
}

/// The file backing module `name` declared in `parent_dir` (`name.rs`, else `name/mod.rs`).
fn module_file(read: Reader, parent_dir: &Path, name: &str) -> Option<(PathBuf, String)> {
    [
        parent_dir.join(format!("{name}.rs")),
        parent_dir.join(name).join("mod.rs"),
    ]
    .into_iter()
    .find_map(|p| read(&p).map(|text| (p, text)))
}

/// Directory holding the files of the modules that `file` declares: its own for a crate root or
/// `mod.rs`, `<dir>/<stem>/` otherwise.
fn children_dir(file: &Path, is_root: bool) -> PathBuf {
    let dir = file.parent().expect("a file has a directory").to_path_buf();
    let stem = file.file_stem().expect("a file name").to_string_lossy();
    if is_root || stem == "mod" {
        dir
    } else {
        dir.join(&*stem)
    }
}

/// One production file of a top-level module and its depth in the tree (1 for the top-level
/// module's own file), which `super::` paths count against.
struct ModFile {
    path: PathBuf,
    depth: usize,
    code: String,
}

/// A module tree's graph: its top-level modules, and for each edge the first place it is made.
#[derive(Default)]
struct Graph {
    nodes: BTreeSet<String>,
    edges: BTreeMap<String, BTreeMap<String, String>>,
}

impl Graph {
    fn add_edge(&mut self, from: &str, to: &str, at: String) {
        self.edges
            .entry(from.to_string())
            .or_default()
            .entry(to.to_string())
            .or_insert(at);
    }

    fn successors(&self, n: &str) -> impl Iterator<Item = &String> {
        self.edges.get(n).into_iter().flat_map(|m| m.keys())
    }
}

/// The graph of the module tree rooted at `root_file` (a `lib.rs`, `main.rs` or `src/bin/*.rs`);
/// `shown` turns a path into the form messages use. Panics naming the declaration when a declared
/// module has no file.
fn module_graph(read: Reader, root_file: &Path, shown: &dyn Fn(&Path) -> String) -> Graph {
    let root_src = read(root_file).unwrap_or_else(|| panic!("cannot read {}", root_file.display()));
    let root_dir = children_dir(root_file, true);
    let mut graph = Graph::default();
    let mut files: BTreeMap<String, Vec<ModFile>> = BTreeMap::new();
    for top in declared_mods(&production_code(&root_src)) {
        graph.nodes.insert(top.clone());
        // Walk the declarations down from the top-level module's file.
        let mut todo = vec![(root_dir.clone(), top.clone(), 1usize)];
        while let Some((dir, name, depth)) = todo.pop() {
            let (path, text) = module_file(read, &dir, &name).unwrap_or_else(|| {
                panic!(
                    "{}: `mod {name};` has no file {name}.rs or {name}/mod.rs in {}",
                    shown(root_file),
                    shown(&dir)
                )
            });
            if is_test_file(&path) {
                continue;
            }
            let code = production_code(&text);
            let sub_dir = children_dir(&path, false);
            for sub in declared_mods(&code) {
                todo.push((sub_dir.clone(), sub, depth + 1));
            }
            files
                .entry(top.clone())
                .or_default()
                .push(ModFile { path, depth, code });
        }
    }
    for (top, files) in &files {
        for f in files {
            for (target, line) in root_paths(&f.code, f.depth) {
                if graph.nodes.contains(&target) && target != *top {
                    graph.add_edge(top, &target, format!("{}:{line}", shown(&f.path)));
                }
            }
        }
    }
    graph
}

/// Every first segment below the crate root that `code` names, with its line: `crate::x`,
/// `crate::{x, y::z}`, and `super::` chains long enough to reach the root from a file at `depth`
/// (inline `mod x { .. }` blocks add to the depth within them).
fn root_paths(code: &str, depth: usize) -> Vec<(String, usize)> {
    let words = words(code);
    let mut out = Vec::new();
    // Brace depths at which inline modules opened, to count `super::` from inside them.
    let mut inline_mods: Vec<usize> = Vec::new();
    let mut braces = 0usize;
    let mut pending_mod = false;
    let mut pos = 0usize;
    let mut k = 0usize;
    let line_of = |at: usize| code[..at].matches('\n').count() + 1;
    while k < words.len() {
        let w = &words[k];
        // Braces between the previous word and this one.
        for ch in code[pos..w.start].chars() {
            match ch {
                '{' => {
                    braces += 1;
                    if pending_mod {
                        inline_mods.push(braces);
                        pending_mod = false;
                    }
                }
                '}' => {
                    if inline_mods.last() == Some(&braces) {
                        inline_mods.pop();
                    }
                    braces = braces.saturating_sub(1);
                }
                ';' => pending_mod = false,
                _ => {}
            }
        }
        pos = w.start;
        match w.text {
            "mod" => pending_mod = true,
            "crate" if code[w.end..].trim_start().starts_with("::") => {
                out.extend(
                    segments_after(code, w.end)
                        .into_iter()
                        .map(|s| (s, line_of(w.start))),
                );
            }
            "super" => {
                // Follow the chain `super::super::..` to its last `super`.
                let mut ups = 0;
                let mut last = k;
                while code[words[last].end..].trim_start().starts_with("::") {
                    ups += 1;
                    match words.get(last + 1) {
                        Some(next)
                            if next.text == "super"
                                && code[words[last].end..next.start].trim() == "::" =>
                        {
                            last += 1
                        }
                        _ => break,
                    }
                }
                if ups >= 1 && ups == depth + inline_mods.len() {
                    let line = line_of(w.start);
                    out.extend(
                        segments_after(code, words[last].end)
                            .into_iter()
                            .map(|s| (s, line)),
                    );
                }
                pos = words[last].end;
                k = last + 1;
                continue;
            }
            _ => {}
        }
        k += 1;
    }
    out
}

/// The first segments after a `::` at `at`: `x` for `::x`, `x` and `y` for `::{x, y::z}`.
fn segments_after(code: &str, at: usize) -> Vec<String> {
    let rest = code[at..].trim_start();
    let Some(rest) = rest.strip_prefix("::") else {
        return Vec::new();
    };
    let rest = rest.trim_start();
    if let Some(group) = rest.strip_prefix('{') {
        // Split the group at its top-level commas; each element starts with its first segment.
        let mut out = Vec::new();
        let mut depth = 0usize;
        let mut element = String::new();
        for ch in group.chars() {
            match ch {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    out.extend(first_ident(&element));
                    element.clear();
                    continue;
                }
                _ => {}
            }
            if depth == 0 {
                element.push(ch);
            }
        }
        out.extend(first_ident(&element));
        out
    } else {
        first_ident(rest).into_iter().collect()
    }
}

fn first_ident(s: &str) -> Option<String> {
    let s = s.trim_start();
    let ident: String = s.chars().take_while(|c| is_ident(*c)).collect();
    (!ident.is_empty()).then_some(ident)
}

/// A cycle between modules: every module of its strongly connected component (sorted), and the
/// shortest cycle through the first of them, as the list of its nodes.
#[derive(Debug, PartialEq)]
struct Cycle {
    component: Vec<String>,
    path: Vec<String>,
}

/// One `Cycle` for each strongly connected component of more than one node (Tarjan).
fn cycles(graph: &Graph) -> Vec<Cycle> {
    struct Tarjan<'g> {
        graph: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        components: Vec<Vec<&'g str>>,
    }
    impl<'g> Tarjan<'g> {
        fn visit(&mut self, v: &'g str) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.graph.successors(v) {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                loop {
                    let w = self.stack.pop().expect("v is on the stack");
                    self.on_stack.remove(w);
                    component.push(w);
                    if w == v {
                        break;
                    }
                }
                self.components.push(component);
            }
        }
    }
    let mut t = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        components: Vec::new(),
    };
    for n in &graph.nodes {
        if !t.index.contains_key(n.as_str()) {
            t.visit(n);
        }
    }
    let mut out = Vec::new();
    for component in t.components.into_iter().filter(|c| c.len() > 1) {
        let members: BTreeSet<&str> = component.into_iter().collect();
        let start = *members.first().expect("a component has members");
        out.push(Cycle {
            component: members.iter().map(|m| m.to_string()).collect(),
            path: shortest_cycle(graph, &members, start),
        });
    }
    out.sort_by(|a, b| a.component.cmp(&b.component));
    out
}

/// The shortest path from `start` back to itself inside `members` (breadth-first).
fn shortest_cycle(graph: &Graph, members: &BTreeSet<&str>, start: &str) -> Vec<String> {
    let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for w in graph.successors(v) {
            let w = w.as_str();
            if w == start {
                let mut path = vec![v.to_string()];
                let mut at = v;
                while at != start {
                    at = parent[at];
                    path.push(at.to_string());
                }
                path.reverse();
                return path;
            }
            if members.contains(w) && !parent.contains_key(w) {
                parent.insert(w, v);
                queue.push_back(w);
            }
        }
    }
    unreachable!("{start} is in a strongly connected component, so a cycle returns to it")
}

/// The message naming a cycle: the modules in order and where each edge is made.
fn describe_cycle(tree: &str, graph: &Graph, cycle: &Cycle) -> String {
    let mut names = cycle.path.clone();
    names.push(cycle.path[0].clone());
    let mut msg = format!("module cycle in {tree}: {}", names.join(" -> "));
    for pair in names.windows(2) {
        let at = &graph.edges[&pair[0]][&pair[1]];
        msg.push_str(&format!("\n    {} -> {}: {at}", pair[0], pair[1]));
    }
    if cycle.component.len() > cycle.path.len() {
        msg.push_str(&format!(
            "\n    (one of the cycles among {})",
            cycle.component.join(", ")
        ));
    }
    msg
}

/// The crate roots of `member`: `src/lib.rs`, `src/main.rs` and `src/bin/*.rs`, those that exist.
fn crate_roots(root: &Path, member: &str) -> Vec<PathBuf> {
    let src = root.join(member).join("src");
    let mut roots: Vec<PathBuf> = ["lib.rs", "main.rs"]
        .iter()
        .map(|f| src.join(f))
        .filter(|p| p.is_file())
        .collect();
    if let Ok(bins) = std::fs::read_dir(src.join("bin")) {
        let mut bins: Vec<PathBuf> = bins
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "rs"))
            .collect();
        bins.sort();
        roots.extend(bins);
    }
    roots
}

/// Goal: no crate has a cycle between its top-level modules (STYLE.md, "Layout"). Method: build
/// the graph of every module tree of every workspace member from its non-test source and fail
/// naming each cycle, with the file and line of each of its edges.
#[test]
fn no_module_cycles() {
    let root = workspace_root();
    let shown = |p: &Path| p.strip_prefix(&root).unwrap_or(p).display().to_string();
    let mut problems = Vec::new();
    let mut trees = 0;
    for member in members(&root) {
        for crate_root in crate_roots(&root, &member) {
            trees += 1;
            let graph = module_graph(&read_disk, &crate_root, &shown);
            let tree = format!("the module tree of {}", shown(&crate_root));
            for cycle in cycles(&graph) {
                problems.push(describe_cycle(&tree, &graph, &cycle));
            }
        }
    }
    assert!(
        trees >= 4,
        "expected a module tree per crate, found {trees}"
    );
    assert!(
        problems.is_empty(),
        "{} module cycle(s); shared types and helpers belong in leaf modules:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// Lines of production code in `src`: those before the first `#[cfg(test)]` line that opens a
/// test module (attributes, comments and blank lines may sit between it and the `mod`), or all.
fn production_lines(src: &str) -> usize {
    let lines: Vec<&str> = src.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.trim() != "#[cfg(test)]" {
            continue;
        }
        let item = lines[i + 1..]
            .iter()
            .map(|l| l.trim())
            .find(|l| !(l.is_empty() || l.starts_with("#[") || l.starts_with("//")));
        if item.is_some_and(|l| {
            l.starts_with("mod ") || l.starts_with("pub mod ") || l.starts_with("pub(crate) mod ")
        }) {
            return i;
        }
    }
    lines.len()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Goal: no production file of the product crates holds more than `MAX_PRODUCTION_LINES` lines of
/// production code. Method: count, in every `.rs` file under each member's `src/` but the test
/// harness crate's (`tests/`), the lines before its test module; test files (`tests.rs`,
/// `*_tests.rs`) are not production; fail naming each file over the limit and its count.
#[test]
fn no_production_file_over_the_line_limit() {
    let root = workspace_root();
    let mut files = Vec::new();
    for member in members(&root).into_iter().filter(|m| m != "tests") {
        rust_files(&root.join(&member).join("src"), &mut files);
    }
    assert!(
        !files.is_empty(),
        "no source files found under {}",
        root.display()
    );
    files.sort();
    let mut over = Vec::new();
    for f in files.iter().filter(|f| !is_test_file(f)) {
        let src = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let n = production_lines(&src);
        if n > MAX_PRODUCTION_LINES {
            let shown = f.strip_prefix(&root).unwrap_or(f).display().to_string();
            over.push(format!("    {shown}: {n} lines"));
        }
    }
    assert!(
        over.is_empty(),
        "{} production file(s) over {MAX_PRODUCTION_LINES} lines of production code; split each \
         along its seams:\n{}",
        over.len(),
        over.join("\n")
    );
}

/// A graph from `(from, to)` pairs, for the cycle finder's own tests.
fn graph_of(edges: &[(&str, &str)]) -> Graph {
    let mut g = Graph::default();
    for (a, b) in edges {
        g.nodes.insert(a.to_string());
        g.nodes.insert(b.to_string());
        g.add_edge(a, b, format!("{a}.rs:1"));
    }
    g
}

/// Goal: the cycle finder finds a planted cycle, names exactly its modules, and reports nothing
/// for an acyclic graph, so `no_module_cycles` can fail. Method: tiny in-memory graphs: a
/// three-module cycle with a module hanging off it and a separate two-module cycle; two cycles
/// sharing a module; a diamond.
#[test]
fn the_cycle_finder_finds_planted_cycles_and_only_those() {
    let g = graph_of(&[
        ("api", "health"),
        ("health", "metrics"),
        ("metrics", "api"),
        ("run", "api"),
        ("api", "store"),
        ("dev", "traffic"),
        ("traffic", "dev"),
    ]);
    let found = cycles(&g);
    let paths: Vec<&[String]> = found.iter().map(|c| &c.path[..]).collect();
    assert_eq!(
        paths,
        [&["api", "health", "metrics"][..], &["dev", "traffic"][..]]
    );
    assert_eq!(found[0].component, ["api", "health", "metrics"]);
    assert_eq!(
        describe_cycle("the module tree of x/src/lib.rs", &g, &found[1]),
        "module cycle in the module tree of x/src/lib.rs: dev -> traffic -> dev\n    \
         dev -> traffic: dev.rs:1\n    traffic -> dev: traffic.rs:1"
    );
    // Two cycles sharing a module are one component; the message names all its modules.
    let twin = graph_of(&[("a", "b"), ("b", "a"), ("b", "c"), ("c", "b")]);
    let found = cycles(&twin);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        describe_cycle("t", &twin, &found[0]),
        "module cycle in t: a -> b -> a\n    a -> b: a.rs:1\n    b -> a: b.rs:1\n    \
         (one of the cycles among a, b, c)"
    );
    let diamond = graph_of(&[("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")]);
    assert!(cycles(&diamond).is_empty());
}

/// Goal: the graph is built from production paths only, in every spelling, and the binary's tree
/// is its own. Method: an in-memory crate whose lib declares `a`, `b`, `c`, `d` and `t`, and whose
/// `main.rs` declares `cli`: `a` reaches `b` through `crate::{b, ..}` in a submodule and
/// `super::super::`; `b` reaches `a` only from a comment, a string, a `#[cfg(test)]` module, a
/// `*_tests.rs` file and an inline module's `super::a` (its parent's `fn a`), so there is no
/// cycle, while the inline module's `super::super::c` is an edge; `c` and `d` form one through `crate::d` and `super::c`;
/// `cli` names `crate::a` but `a` is not in the binary's tree.
#[test]
fn the_graph_reads_production_paths_only() {
    let files: BTreeMap<PathBuf, &str> = [
        (
            "src/lib.rs",
            "//! lib\npub mod a;\npub mod b;\nmod c;\npub mod d;\n#[cfg(test)]\nmod t;\n",
        ),
        ("src/main.rs", "mod cli;\nfn main() {}\n"),
        ("src/cli.rs", "use crate::a;\n"),
        ("src/a.rs", "//! a\nmod inner;\n"),
        (
            "src/a/inner.rs",
            "use crate::{\n    b::{X, Y},\n    self,\n};\nfn f() { super::super::b::g(); }\n",
        ),
        (
            "src/b.rs",
            "// crate::a::f()\n/* crate::a */ const S: &str = \"crate::a::x\";\n\
             const R: &str = r#\"super::a\"#;\nconst C: char = '{';\n\
             #[cfg(test)]\nmod tests {\n    use crate::a;\n}\n#[cfg(test)]\nmod more_tests;\n\
             fn g<'x>(s: &'x str) -> &'x str { s }\nfn a() {}\n\
             mod inner { fn f() { super::a() } }\n\
             mod deep { fn g() { super::super::c::x() } }\n",
        ),
        ("src/b/more_tests.rs", "use crate::a;\n"),
        ("src/c.rs", "use crate::d::Thing;\n"),
        ("src/d.rs", "fn f() { super::c::go() }\n"),
        ("src/t.rs", "use crate::a;\n"),
    ]
    .into_iter()
    .map(|(p, s)| (PathBuf::from(p), s))
    .collect();
    let read = |p: &Path| files.get(p).map(|s| s.to_string());
    let shown = |p: &Path| p.display().to_string();
    let lib = module_graph(&read, Path::new("src/lib.rs"), &shown);
    assert_eq!(
        lib.nodes.iter().collect::<Vec<_>>(),
        ["a", "b", "c", "d"],
        "the cfg(test) module is not a node"
    );
    let edges: Vec<(String, String, String)> = lib
        .edges
        .iter()
        .flat_map(|(a, m)| m.iter().map(|(b, at)| (a.clone(), b.clone(), at.clone())))
        .collect();
    assert_eq!(
        edges,
        [
            ("a".into(), "b".into(), "src/a/inner.rs:1".into()),
            ("b".into(), "c".into(), "src/b.rs:14".into()),
            ("c".into(), "d".into(), "src/c.rs:1".into()),
            ("d".into(), "c".into(), "src/d.rs:1".into()),
        ]
    );
    let found = cycles(&lib);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].path, ["c", "d"]);
    let bin = module_graph(&read, Path::new("src/main.rs"), &shown);
    assert_eq!(bin.nodes.iter().collect::<Vec<_>>(), ["cli"]);
    assert!(
        bin.edges.is_empty(),
        "crate::a names the library's module, not the binary's"
    );
}

/// Goal: production lines stop at the test module, not at any `#[cfg(test)]` item. Method: a file
/// with a `#[cfg(test)]` function at line 3 and its test module's attribute at line 6.
#[test]
fn production_lines_stop_at_the_test_module() {
    let src =
        "//! f\nfn a() {}\n#[cfg(test)]\nfn helper() {}\n\n#[cfg(test)]\n// why\nmod tests {\n}\n";
    assert_eq!(production_lines(src), 5);
    assert_eq!(production_lines("fn a() {}\nfn b() {}\n"), 2);
}
