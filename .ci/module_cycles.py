#!/usr/bin/env python3
"""Module-level dependency cycles in a Rust crate.

Usage: module_cycles.py SRC_DIR [--examples N] [--edges] [--check]

With --check, exits 1 when the top-level or the second-level (crate::) graph has a cycle:
.ci/run runs it so that a new import cycle fails CI.

Each file's module path comes from its location (src/a.rs, src/a/mod.rs -> a;
src/a/b.rs -> a::b).  Paths in code and `use` trees (grouped `{..}` trees are
expanded) starting with `crate::`, `super::`, `self::` or a declared child
module name are resolved to absolute module paths.  Comments, strings and
`#[cfg(test)]` items / test-only files are ignored; src/main.rs (the binary,
which uses `tidegate::`) and src/lib.rs (the root) are not graph sources.
`pub use` re-exports in lib.rs and in directory mod.rs files are followed one
level, so `crate::limit::RouteSpec` counts as an edge to `limit::route`.

Graphs reported:
  L1          nodes = top-level modules; every resolved reference (relative
              `super::`/`self::` ones are intra-module, so they only matter if
              they escape the module).
  L2-crate    nodes = a::b for directory modules a (a = a/mod.rs), plain
              top-level file modules otherwise; only `crate::`-rooted references.
  L2-all      as L2-crate plus intra-directory `super::`/`self::`/child refs
              (surfaces parent <-> child cycles through mod.rs).
Strongly connected components with more than one node are printed with
example edges (file:line).
"""
import os
import re
import sys
from collections import defaultdict


# ---------------------------------------------------------------- lexing
def strip_rust(src):
    out = []
    i, n = 0, len(src)

    def blank(s):
        return ''.join('\n' if c == '\n' else ' ' for c in s)

    while i < n:
        c = src[i]
        nxt = src[i + 1] if i + 1 < n else ''
        prev = src[i - 1] if i > 0 else ''
        if c == '/' and nxt == '/':
            j = src.find('\n', i)
            j = n if j < 0 else j
            out.append(blank(src[i:j])); i = j; continue
        if c == '/' and nxt == '*':
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith('/*', j):
                    depth += 1; j += 2
                elif src.startswith('*/', j):
                    depth -= 1; j += 2
                else:
                    j += 1
            out.append(blank(src[i:j])); i = j; continue
        m = re.match(r'(?:b|c)?r(#*)"', src[i:i + 260])
        if m and not (prev.isalnum() or prev == '_'):
            end = '"' + m.group(1)
            j = src.find(end, i + m.end())
            j = n if j < 0 else j + len(end)
            out.append(blank(src[i:j])); i = j; continue
        if c == '"' or (c in 'bc' and nxt == '"' and not (prev.isalnum() or prev == '_')):
            j = i + (1 if c == '"' else 2)
            while j < n and src[j] != '"':
                j += 2 if src[j] == '\\' else 1
            j += 1
            out.append(blank(src[i:j])); i = j; continue
        if c == "'" or (c == 'b' and nxt == "'" and not (prev.isalnum() or prev == '_')):
            k = i + (1 if c == "'" else 2)
            if k < n and src[k] == '\\':
                j = k + 1
                while j < n and src[j] != "'":
                    j += 1
                j += 1
                out.append(blank(src[i:j])); i = j; continue
            if k + 1 < n and src[k + 1] == "'":
                out.append(blank(src[i:k + 2])); i = k + 2; continue
            out.append(c); i += 1; continue
        out.append(c); i += 1
    return ''.join(out)


def match_brace(code, open_idx):
    depth = 0
    for j in range(open_idx, len(code)):
        if code[j] == '{':
            depth += 1
        elif code[j] == '}':
            depth -= 1
            if depth == 0:
                return j
    return len(code) - 1


def item_end(code, start):
    par = 0
    for j in range(start, len(code)):
        ch = code[j]
        if ch in '([':
            par += 1
        elif ch in ')]':
            par -= 1
        elif par == 0 and ch == ';':
            return j
        elif par == 0 and ch == '{':
            return match_brace(code, j)
    return len(code) - 1


CFG_TEST = re.compile(r'#\s*\[\s*cfg\s*\(\s*test\s*\)\s*\]')
MOD_DECL = re.compile(r'(#\s*\[\s*cfg\s*\(\s*test\s*\)\s*\]\s*)?(?:pub(?:\s*\([^)]*\))?\s+)?\bmod\s+(\w+)\s*;')
TOKEN = re.compile(r'[A-Za-z_]\w*|::|\S')


def tokenize(code, base=0, line_base=1):
    toks = []
    line = line_base
    last = 0
    for m in TOKEN.finditer(code):
        line += code.count('\n', last, m.start())
        last = m.start()
        toks.append((m.group(), line, base + m.start()))
    toks.append(('<eof>', line, base + len(code)))
    return toks


def parse_tree(toks, i, prefix, out):
    """Parse a path / use tree at toks[i]; append (segments, alias, line) leaves."""
    t = toks[i][0]
    if t == '{':
        i += 1
        while toks[i][0] not in ('}', '<eof>'):
            j = parse_tree(toks, i, prefix, out)
            if j == i:
                j += 1
            i = j
            if toks[i][0] == ',':
                i += 1
        return i + 1
    if t == '*':
        out.append((prefix + ['*'], None, toks[i][1]))
        return i + 1
    if re.match(r'[A-Za-z_]\w*$', t):
        segs = prefix + [t]
        line = toks[i][1]
        i += 1
        if toks[i][0] == '::' and toks[i + 1][0] not in ('<',):
            return parse_tree(toks, i + 1, segs, out)
        if toks[i][0] == 'as':
            out.append((segs, toks[i + 1][0], line))
            return i + 2
        out.append((segs, None, line))
        return i
    if prefix:
        out.append((prefix, None, toks[i][1]))
    return i


# ---------------------------------------------------------------- crate model
class File:
    def __init__(self, path, rel, modpath, code, test_file):
        self.path, self.rel, self.modpath, self.code = path, rel, modpath, code
        self.test_file = test_file
        self.children = set()      # declared non-test `mod x;`
        self.test_ranges = []
        for m in CFG_TEST.finditer(code):
            self.test_ranges.append((m.start(), item_end(code, m.end())))
        for m in MOD_DECL.finditer(code):
            if not m.group(1):
                self.children.add(m.group(2))

    def in_test(self, pos):
        return self.test_file or any(a <= pos <= b for a, b in self.test_ranges)


def load(src_dir):
    src_dir = os.path.normpath(src_dir)
    files = {}
    test_paths = set()
    for root, _, names in os.walk(src_dir):
        for f in sorted(names):
            if not f.endswith('.rs'):
                continue
            p = os.path.join(root, f)
            rel = os.path.relpath(p, os.path.dirname(src_dir))
            parts = os.path.relpath(p, src_dir)[:-3].split(os.sep)
            if parts[-1] in ('mod', 'lib', 'main'):
                parts = parts[:-1]
            code = strip_rust(open(p, encoding='utf-8').read())
            files[p] = File(p, rel, parts, code, False)
            base = root if f in ('mod.rs', 'lib.rs', 'main.rs') else p[:-3]
            for m in MOD_DECL.finditer(code):
                if m.group(1):
                    for c in (os.path.join(base, m.group(2) + '.rs'), os.path.join(base, m.group(2), 'mod.rs')):
                        test_paths.add(os.path.normpath(c))
    for p in test_paths:
        if p in files:
            files[p].test_file = True
    return src_dir, files


def raw_refs(f):
    """Yield (segments, alias, line, pos, kind) for module paths in non-test code."""
    toks = tokenize(f.code)
    i, n = 0, len(toks)
    while i < n - 1:
        t, line, pos = toks[i]
        prev = toks[i - 1][0] if i else ''
        if (toks[i + 1][0] == '::' and prev not in ('::', '.')
                and (t in ('crate', 'self', 'super') or t in f.children)
                and not f.in_test(pos)):
            out = []
            j = parse_tree(toks, i, [], out)
            for segs, alias, ln in out:
                kind = 'crate' if segs[0] == 'crate' else 'relative'
                yield segs, alias, ln, pos, kind
            i = max(j, i + 1)
            continue
        i += 1


def absolute(f, segs):
    """Absolute module path (list) for segments seen in file f, or None."""
    segs = [s for s in segs if s not in ('*',)]
    if segs and segs[-1] == 'self':
        segs = segs[:-1]
    if not segs:
        return None
    if segs[0] == 'crate':
        return segs[1:]
    if segs[0] in ('self', 'super'):
        cur = list(f.modpath)
        k = 0
        if segs[0] == 'self':
            k = 1
        while k < len(segs) and segs[k] == 'super':
            cur = cur[:-1]
            k += 1
        return cur + segs[k:]
    return list(f.modpath) + segs  # declared child module


def build(src_dir, files):
    by_mod = {tuple(f.modpath): f for f in files.values() if not f.rel.endswith('main.rs')}
    root = by_mod.get(())
    top = sorted(root.children) if root else []
    dirs = {m for m in top if os.path.isdir(os.path.join(src_dir, m))}
    children = {m: sorted(by_mod[(m,)].children) if (m,) in by_mod else [] for m in top}
    # re-export maps: module tuple -> {name: submodule}
    reexp = defaultdict(dict)
    for mod, f in by_mod.items():
        for m in re.finditer(r'\bpub\s*(?:\([^)]*\))?\s*use\s+([^;]+);', f.code):
            if f.in_test(m.start()):
                continue
            toks = tokenize(m.group(1))
            out = []
            parse_tree(toks, 0, [], out)
            for segs, alias, _ in out:
                if segs[0] not in ('crate', 'self', 'super') and segs[0] not in f.children:
                    continue
                ab = absolute(f, segs)
                if ab and len(ab) > len(mod) and segs[-1] not in ('*', 'self'):
                    reexp[mod][alias or segs[-1]] = ab[len(mod)]
    return top, dirs, children, reexp


def node_of(ab, top, dirs, children, reexp, level):
    if not ab:
        return None
    if ab[0] not in top:
        sub = reexp[()].get(ab[0])
        if sub is None:
            return None  # crate-root item (e.g. EXIT_* consts) or unknown
        ab = [sub] + ab[1:]  # name re-exported by lib.rs; keep name for L2 lookup
    a = ab[0]
    if level == 1 or a not in dirs or len(ab) < 2:
        return a
    b = ab[1]
    if b in children[a]:
        return f'{a}::{b}'
    sub = reexp[(a,)].get(b)
    return f'{a}::{sub}' if sub else a


def tarjan(nodes, adj):
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]; counter[0] += 1
        stack.append(v); on.add(v)
        for w in sorted(adj.get(v, ())):
            if w not in index:
                visit(w); low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def report(title, edges, nodes, n_examples, show_edges):
    adj = defaultdict(set)
    for (a, b) in edges:
        adj[a].add(b)
    sccs = [c for c in tarjan(nodes, adj) if len(c) > 1]
    print(f'## {title}: {len(nodes)} nodes, {len(edges)} edges, {len(sccs)} cyclic SCC(s)')
    if show_edges:
        for a in sorted(adj):
            print(f'   {a} -> ' + ', '.join(f'{b}({len(edges[(a, b)])})' for b in sorted(adj[a])))
    for k, comp in enumerate(sorted(sccs, key=len, reverse=True), 1):
        cs = set(comp)
        print(f'### SCC {k} ({len(comp)} modules): ' + ', '.join(comp))
        for (a, b) in sorted(edges):
            if a in cs and b in cs:
                ex = edges[(a, b)]
                uniq = []
                for e in ex:
                    if e not in uniq:
                        uniq.append(e)
                print(f'   {a} -> {b} [{len(ex)} refs] e.g. ' + '; '.join(uniq[:n_examples]))
    print()
    return len(sccs)


def main():
    args = sys.argv[1:]
    src = args[0]
    n_ex = int(args[args.index('--examples') + 1]) if '--examples' in args else 2
    show = '--edges' in args
    src_dir, files = load(src)
    top, dirs, children, reexp = build(src_dir, files)
    l1, l2c, l2a = defaultdict(list), defaultdict(list), defaultdict(list)
    nodes2 = set()
    for m in top:
        nodes2.add(m)
        for c in children[m] if m in dirs else []:
            nodes2.add(f'{m}::{c}')
    for f in files.values():
        if not f.modpath or f.rel.endswith('main.rs') or f.test_file:
            continue
        s1 = f.modpath[0]
        s2 = '::'.join(f.modpath[:2]) if s1 in dirs else s1
        for segs, alias, line, pos, kind in raw_refs(f):
            ab = absolute(f, segs)
            where = f'{f.rel}:{line}'
            t1 = node_of(ab, top, dirs, children, reexp, 1)
            t2 = node_of(ab, top, dirs, children, reexp, 2)
            if t1 and t1 != s1:
                l1[(s1, t1)].append(where)
            if t2 and t2 != s2:
                l2a[(s2, t2)].append(where)
                if kind == 'crate':
                    l2c[(s2, t2)].append(where)
    print(f'# top-level modules ({len(top)}): ' + ', '.join(top))
    print(f'# directory modules: ' + ', '.join(f'{d}[{",".join(children[d])}]' for d in sorted(dirs)))
    print()
    cycles = report('L1 (top-level modules)', l1, set(top), n_ex, show)
    cycles += report('L2-crate (second-level, crate:: paths only)', l2c, nodes2, n_ex, show)
    report('L2-all (second-level, incl. super::/self::/child paths)', l2a, nodes2, n_ex, show)
    if '--check' in args and cycles:
        sys.exit(f'{cycles} import cycle(s) between modules')


if __name__ == '__main__':
    main()
