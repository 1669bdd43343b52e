//! The shape of `src/`, checked, so that the rules of the README's Layout section hold
//! without anyone remembering them:
//!
//! 1. the top-level modules of `src/` form no import cycle (a cycle means no module in
//!    it can be read, tested or changed without the others);
//! 2. a source never imports a sibling source's module (`crate::source::a::x` from
//!    `src/source/b/`): what two sources share lives in a shared room, and a source's
//!    own files are its business;
//! 3. no file in `src/` is above 700 lines unless its opening `//!` comment says why, in
//!    a line containing "Long because";
//! 4. the bus layer (`src/bus/`) names no source: no path into a source's module, no
//!    source's name or signal member as a string, no signal struct. What it serves of a
//!    source comes through the catalogue and the sources' own `signal.rs`.
//!
//! Plain Rust over the files, parsed with `syn`; no daemon. Paths count wherever they are
//! written: `use` trees, types, expressions and macro bodies, written from `crate::`,
//! `super::` or `self::`. Items under `#[cfg(test)]` do not count: a unit test may reach
//! any layer to build what it tests, and it does not ship. The binaries (`src/main.rs`,
//! `src/bin/`) reach the library by its name, so they cannot close a cycle and are left
//! out of rules 1 and 2.
//!
//! Each allow-list below names an exception with its reason (all empty now); an entry
//! that no longer matches anything fails the test too, so that the lists only shrink.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use syn::visit::Visit;

const MAX_LINES: usize = 700;
const LONG_REASON: &str = "Long because";

/// Files above [`MAX_LINES`] without a reason, for now: (file, who splits it).
const LONG_ALLOWED: &[(&str, &str)] = &[];

/// Imports of a sibling source's module, for now: (importing file, imported module,
/// who removes it).
const SIBLING_ALLOWED: &[(&str, &str, &str)] = &[];

/// Import edges between top-level modules left out of the cycle check, for now: (from,
/// to, who removes it).
const EDGE_ALLOWED: &[(&str, &str, &str)] = &[];

struct SrcFile {
    /// As written in messages: `src/dispatch/mod.rs`.
    name: String,
    /// The module the file is: `["source", "devices", "wire"]`; empty for `lib.rs`.
    module: Vec<String>,
    text: String,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .path();
        if path.is_dir() {
            walk(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

/// Every `.rs` file below `src/`, in a stable order.
fn src_files() -> Vec<SrcFile> {
    let root = src_dir();
    let mut paths = Vec::new();
    walk(&root, &mut paths);
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let relative = path.strip_prefix(&root).expect("below src/");
            let mut module: Vec<String> = relative
                .with_extension("")
                .iter()
                .map(|c| c.to_string_lossy().into_owned())
                .collect();
            if matches!(module.last().map(String::as_str), Some("mod" | "lib")) {
                module.pop();
            }
            SrcFile {
                name: format!("src/{}", relative.display()),
                module,
                text: std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display())),
            }
        })
        .collect()
}

fn is_binary(file: &SrcFile) -> bool {
    matches!(
        file.module.first().map(String::as_str),
        Some("main" | "bin")
    )
}

/// The paths one file names from `crate::`, `super::` or `self::`, as absolute module
/// paths (`["source", "devices", "NAME"]`), each with the text it was written as.
#[derive(Default)]
struct Paths {
    /// The module being read: the file's, plus inline `mod` blocks entered.
    module: Vec<String>,
    found: Vec<(Vec<String>, String)>,
}

impl Paths {
    fn add(&mut self, segments: &[String]) {
        let Some(first) = segments.first() else {
            return;
        };
        let absolute = match first.as_str() {
            "crate" => segments[1..].to_vec(),
            "self" => [&self.module[..], &segments[1..]].concat(),
            "super" => {
                let up = segments.iter().take_while(|s| *s == "super").count();
                let Some(keep) = self.module.len().checked_sub(up) else {
                    return;
                };
                [&self.module[..keep], &segments[up..]].concat()
            }
            _ => return,
        };
        if !absolute.is_empty() {
            self.found.push((absolute, segments.join("::")));
        }
    }

    fn use_tree(&mut self, tree: &syn::UseTree, prefix: &mut Vec<String>) {
        match tree {
            syn::UseTree::Path(path) => {
                prefix.push(path.ident.to_string());
                self.use_tree(&path.tree, prefix);
                prefix.pop();
            }
            syn::UseTree::Name(name) => {
                let mut full = prefix.clone();
                if name.ident != "self" {
                    full.push(name.ident.to_string());
                }
                self.add(&full);
            }
            syn::UseTree::Rename(rename) => {
                let mut full = prefix.clone();
                if rename.ident != "self" {
                    full.push(rename.ident.to_string());
                }
                self.add(&full);
            }
            syn::UseTree::Glob(_) => {
                let full = prefix.clone();
                self.add(&full);
            }
            syn::UseTree::Group(group) => {
                for tree in &group.items {
                    self.use_tree(tree, prefix);
                }
            }
        }
    }
}

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|attr| {
        attr.path().is_ident("cfg")
            && attr
                .parse_args::<syn::Meta>()
                .is_ok_and(|meta| meta.path().is_ident("test"))
    })
}

fn item_attrs(item: &syn::Item) -> &[syn::Attribute] {
    match item {
        syn::Item::Const(i) => &i.attrs,
        syn::Item::Enum(i) => &i.attrs,
        syn::Item::ExternCrate(i) => &i.attrs,
        syn::Item::Fn(i) => &i.attrs,
        syn::Item::ForeignMod(i) => &i.attrs,
        syn::Item::Impl(i) => &i.attrs,
        syn::Item::Macro(i) => &i.attrs,
        syn::Item::Mod(i) => &i.attrs,
        syn::Item::Static(i) => &i.attrs,
        syn::Item::Struct(i) => &i.attrs,
        syn::Item::Trait(i) => &i.attrs,
        syn::Item::TraitAlias(i) => &i.attrs,
        syn::Item::Type(i) => &i.attrs,
        syn::Item::Union(i) => &i.attrs,
        syn::Item::Use(i) => &i.attrs,
        _ => &[],
    }
}

impl<'ast> Visit<'ast> for Paths {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        if !is_cfg_test(item_attrs(item)) {
            syn::visit::visit_item(self, item);
        }
    }

    fn visit_item_mod(&mut self, item: &'ast syn::ItemMod) {
        self.module.push(item.ident.to_string());
        syn::visit::visit_item_mod(self, item);
        self.module.pop();
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        self.use_tree(&item.tree, &mut Vec::new());
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        if path.segments.len() > 1 {
            let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
            self.add(&segments);
        }
        syn::visit::visit_path(self, path);
    }

    /// A macro's body is tokens, not syntax: the paths in it are read from its text,
    /// which `proc_macro2` writes as `crate :: a :: b`.
    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        let text = mac.tokens.to_string();
        let words: Vec<&str> = text.split_whitespace().collect();
        for (at, word) in words.iter().enumerate() {
            if !matches!(*word, "crate" | "super") || words.get(at + 1) != Some(&"::") {
                continue;
            }
            let mut segments = vec![(*word).to_owned()];
            let mut next = at + 2;
            while let Some(segment) = words.get(next) {
                let ident = segment.trim_end_matches(|c: char| !c.is_alphanumeric() && c != '_');
                if ident.is_empty() {
                    break;
                }
                segments.push(ident.to_owned());
                if ident != *segment || words.get(next + 1) != Some(&"::") {
                    break;
                }
                next += 2;
            }
            self.add(&segments);
        }
        syn::visit::visit_macro(self, mac);
    }
}

fn paths_of(file: &SrcFile) -> Vec<(Vec<String>, String)> {
    let ast = syn::parse_file(&file.text).unwrap_or_else(|e| panic!("{}: {e}", file.name));
    let mut paths = Paths {
        module: file.module.clone(),
        found: Vec::new(),
    };
    paths.visit_file(&ast);
    paths.found
}

/// Who imports whom among the top-level modules, each edge with one place that makes it.
type Graph = BTreeMap<String, BTreeMap<String, String>>;

fn top_level_graph(files: &[SrcFile]) -> Graph {
    let top: BTreeSet<&str> = files
        .iter()
        .filter(|f| !is_binary(f))
        .filter_map(|f| f.module.first().map(String::as_str))
        .collect();
    let mut graph = Graph::new();
    for file in files.iter().filter(|f| !is_binary(f)) {
        let Some(from) = file.module.first() else {
            continue;
        };
        graph.entry(from.clone()).or_default();
        for (path, written) in paths_of(file) {
            let to = &path[0];
            if to == from || !top.contains(to.as_str()) {
                continue;
            }
            graph
                .entry(from.clone())
                .or_default()
                .entry(to.clone())
                .or_insert_with(|| format!("{}: {written}", file.name));
        }
    }
    graph
}

/// The strongly connected components of more than one module (Tarjan's algorithm).
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct Tarjan<'g> {
        graph: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        found: Vec<Vec<String>>,
    }
    impl<'g> Tarjan<'g> {
        fn visit(&mut self, node: &'g str) {
            let index = self.index.len();
            self.index.insert(node, index);
            self.low.insert(node, index);
            self.stack.push(node);
            self.on_stack.insert(node);
            for next in self.graph.get(node).into_iter().flat_map(BTreeMap::keys) {
                let next = next.as_str();
                if !self.index.contains_key(next) {
                    self.visit(next);
                    let low = self.low[node].min(self.low[next]);
                    self.low.insert(node, low);
                } else if self.on_stack.contains(next) {
                    let low = self.low[node].min(self.index[next]);
                    self.low.insert(node, low);
                }
            }
            if self.low[node] == self.index[node] {
                let mut component = Vec::new();
                while let Some(member) = self.stack.pop() {
                    self.on_stack.remove(member);
                    component.push(member.to_owned());
                    if member == node {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut tarjan = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for node in graph.keys() {
        if !tarjan.index.contains_key(node.as_str()) {
            tarjan.visit(node);
        }
    }
    tarjan.found
}

/// One shortest cycle through `start` inside `component`, as `a → b → … → a` with the
/// place that makes each step.
fn describe_cycle(graph: &Graph, component: &[String], start: &str) -> String {
    let mut previous: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    let mut closing = None;
    while let Some(node) = queue.pop_front() {
        for next in graph[node].keys() {
            if !component.contains(next) {
                continue;
            }
            if next == start {
                closing = Some(node);
                break;
            }
            if !previous.contains_key(next.as_str()) {
                previous.insert(next, node);
                queue.push_back(next);
            }
        }
        if closing.is_some() {
            break;
        }
    }
    let mut inner = Vec::new();
    let mut node = closing.expect("a component of more than one module has a cycle");
    while node != start {
        inner.push(node);
        node = previous[node];
    }
    inner.reverse();
    let path = [&[start][..], &inner, &[start]].concat();
    path.windows(2)
        .map(|step| {
            format!(
                "  {} → {}   ({})",
                step[0], step[1], graph[step[0]][step[1]]
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn top_level_modules_form_no_import_cycle() {
    let files = src_files();
    let mut graph = top_level_graph(&files);
    // The check must see the graph it checks: dispatch fans records out.
    assert!(
        graph
            .get("dispatch")
            .is_some_and(|to| to.contains_key("event")),
        "the import graph misses dispatch → event: {graph:#?}"
    );
    let mut failures = Vec::new();
    for (from, to, reason) in EDGE_ALLOWED {
        if graph.get_mut(*from).and_then(|e| e.remove(*to)).is_none() {
            failures.push(format!(
                "EDGE_ALLOWED lists {from} → {to} ({reason}), which no longer exists: remove the entry"
            ));
        }
    }
    for component in cycles(&graph) {
        failures.push(format!(
            "import cycle among {}:\n{}",
            component.join(", "),
            describe_cycle(&graph, &component, &component[0])
        ));
    }
    assert!(failures.is_empty(), "\n{}\n", failures.join("\n\n"));
}

#[test]
fn no_source_imports_a_sibling_sources_module() {
    let files = src_files();
    let sources = src_dir().join("source");
    let is_module_of = |source: &str, name: &str| {
        let folder = sources.join(source);
        folder.is_dir()
            && (folder.join(format!("{name}.rs")).is_file()
                || folder.join(name).join("mod.rs").is_file())
    };
    let mut allowed_seen = BTreeSet::new();
    // One failure per file and imported module, with the first place it is named.
    let mut failures = BTreeMap::new();
    for file in &files {
        let [first, own, ..] = &file.module[..] else {
            continue;
        };
        if first != "source" || !sources.join(own).is_dir() {
            continue;
        }
        for (path, written) in paths_of(file) {
            let [first, other, module, ..] = &path[..] else {
                continue;
            };
            if first != "source" || other == own || !is_module_of(other, module) {
                continue;
            }
            let imported = format!("source::{other}::{module}");
            if let Some(entry) = SIBLING_ALLOWED
                .iter()
                .find(|(f, m, _)| *f == file.name && *m == imported)
            {
                allowed_seen.insert(*entry);
                continue;
            }
            failures
                .entry((file.name.clone(), imported))
                .or_insert_with(|| {
                    format!(
                        "{}: {written}: the {own} source imports the {other} source's module \
                         {module}; move what both need to the shared room",
                        file.name
                    )
                });
        }
    }
    let mut failures: Vec<String> = failures.into_values().collect();
    for entry in SIBLING_ALLOWED {
        if !allowed_seen.contains(entry) {
            failures.push(format!(
                "SIBLING_ALLOWED lists {} importing {} ({}), which no longer happens: remove the entry",
                entry.0, entry.1, entry.2
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}\n", failures.join("\n"));
}

#[test]
fn no_file_is_long_without_a_reason() {
    let mut failures = Vec::new();
    let mut allowed_seen = BTreeSet::new();
    for file in src_files() {
        let lines = file.text.lines().count();
        let reason_given = file
            .text
            .lines()
            .take_while(|line| line.trim_start().starts_with("//!"))
            .any(|line| line.contains(LONG_REASON));
        if lines <= MAX_LINES || reason_given {
            continue;
        }
        if let Some((name, _)) = LONG_ALLOWED.iter().find(|(name, _)| *name == file.name) {
            allowed_seen.insert(*name);
            continue;
        }
        failures.push(format!(
            "{}: {lines} lines (more than {MAX_LINES}): split it along its jobs, or say why not \
             in its opening //! comment, in a line containing \"{LONG_REASON}\"",
            file.name
        ));
    }
    for (name, who) in LONG_ALLOWED {
        if !allowed_seen.contains(name) {
            failures.push(format!(
                "LONG_ALLOWED lists {name} ({who}), which is no longer long without a reason: remove the entry"
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}\n", failures.join("\n"));
}

/// Every built-in source as the code could name it: its folder, its `NAME` and its
/// signal's member (the struct `event_signal!` declares in its `signal.rs`).
struct SourceNames {
    folders: BTreeSet<String>,
    /// `NAME`s and members, which the bus must not write as strings.
    strings: BTreeSet<String>,
    /// Members and their signal methods' names, which the bus must not write at all.
    members: BTreeSet<String>,
}

fn source_names() -> SourceNames {
    let mut names = SourceNames {
        folders: BTreeSet::new(),
        strings: BTreeSet::new(),
        members: BTreeSet::new(),
    };
    let sources = src_dir().join("source");
    for entry in std::fs::read_dir(&sources).expect("src/source") {
        let folder = entry.expect("src/source entry").path();
        if !folder.join("signal.rs").is_file() {
            continue;
        }
        let module = std::fs::read_to_string(folder.join("mod.rs")).expect("a source's mod.rs");
        let name = module
            .lines()
            .find_map(|line| line.trim().strip_prefix("pub const NAME: &str = \""))
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_else(|| panic!("{}: no `pub const NAME`", folder.display()));
        let signal = std::fs::read_to_string(folder.join("signal.rs")).expect("signal.rs");
        let member = signal
            .lines()
            .find_map(|line| line.trim().strip_prefix("pub struct "))
            .and_then(|rest| rest.split('(').next())
            .unwrap_or_else(|| panic!("{}: no signal struct", folder.display()));
        names.strings.insert(name.to_owned());
        names.strings.insert(member.to_owned());
        names.members.insert(member.to_owned());
        // The name of its `#[zbus(signal)]` method: `DeviceChanged` → `device_changed`.
        let mut method = String::new();
        for c in member.chars() {
            if c.is_uppercase() && !method.is_empty() {
                method.push('_');
            }
            method.extend(c.to_lowercase());
        }
        names.members.insert(method);
        names.folders.insert(
            folder
                .file_name()
                .expect("a folder name")
                .to_string_lossy()
                .into_owned(),
        );
    }
    assert!(names.folders.len() >= 7, "found only {:?}", names.folders);
    names
}

/// What in a token stream names a source: string literals that are a source's name or
/// member, and identifiers that are a member. Doc comments are prose, not names.
fn named_in(tokens: proc_macro2::TokenStream, names: &SourceNames, found: &mut Vec<String>) {
    let mut after_doc = false;
    for token in tokens {
        match token {
            proc_macro2::TokenTree::Group(group) => {
                // `#[doc = "…"]`: the bracketed group starts with `doc`.
                let mut inner = group.stream().into_iter();
                let is_doc =
                    matches!(inner.next(), Some(proc_macro2::TokenTree::Ident(i)) if i == "doc");
                if !is_doc {
                    named_in(group.stream(), names, found);
                }
                after_doc = false;
            }
            proc_macro2::TokenTree::Ident(ident) => {
                let ident = ident.to_string();
                after_doc = ident == "doc";
                if names.members.contains(&ident) {
                    found.push(ident);
                }
            }
            proc_macro2::TokenTree::Literal(literal) => {
                if !after_doc {
                    if let Ok(text) = syn::parse_str::<syn::LitStr>(&literal.to_string()) {
                        if names.strings.contains(&text.value()) {
                            found.push(format!("\"{}\"", text.value()));
                        }
                    }
                }
                after_doc = false;
            }
            proc_macro2::TokenTree::Punct(_) => {}
        }
    }
}

#[test]
fn the_bus_names_no_source() {
    let names = source_names();
    let mut failures = Vec::new();
    for file in src_files()
        .iter()
        .filter(|f| f.module.first().is_some_and(|m| m == "bus"))
    {
        for (path, written) in paths_of(file) {
            if let [first, folder, ..] = &path[..] {
                if first == "source" && names.folders.contains(folder) {
                    failures.push(format!(
                        "{}: {written}: a path into the {folder} source",
                        file.name
                    ));
                }
            }
        }
        let tokens: proc_macro2::TokenStream = file
            .text
            .parse()
            .unwrap_or_else(|e| panic!("{}: {e}", file.name));
        let mut found = Vec::new();
        named_in(tokens, &names, &mut found);
        failures.extend(
            found
                .into_iter()
                .map(|name| format!("{}: names a source: {name}", file.name)),
        );
    }
    assert!(
        failures.is_empty(),
        "\nthe bus layer must reach sources only through the catalogue and their signal.rs:\n{}\n",
        failures.join("\n")
    );
}
