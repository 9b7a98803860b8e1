//! PEFT's `rank_pattern` / `alpha_pattern` keys are regular expressions: a module takes the
//! first pattern `p` (in the config's order) for which Python's
//! `re.match(rf"(.*\.)?({p})$", module)` succeeds (peft/utils/other.py `get_pattern_key`).
//! This is a small regular-expression matcher for that: literals, `.`, classes `[a-z_]` /
//! `[^…]`, escapes (`\.`, `\d`, `\w`, `\s` and their negations), groups `(…)` / `(?:…)`,
//! alternation `|`, the quantifiers `* + ? {m} {m,} {m,n}` (lazy forms accepted: they match
//! the same strings), and `^` / `$`. It compiles to a Thompson NFA and simulates it, so it
//! never backtracks exponentially. Other syntax (look-arounds, back-references) is an error.

/// A compiled pattern.
#[derive(Clone, Debug)]
pub(crate) struct Regex {
    prog: Vec<Inst>,
}

#[derive(Clone, Debug)]
enum Inst {
    Char(char),
    Any,
    Class { ranges: Vec<(char, char)>, negated: bool },
    Split(usize, usize),
    Jmp(usize),
    Start,
    End,
    Match,
}

#[derive(Clone, Debug)]
enum Node {
    Char(char),
    Any,
    Class { ranges: Vec<(char, char)>, negated: bool },
    Group(Vec<Vec<Item>>),
    Start,
    End,
}

#[derive(Clone, Debug)]
struct Item {
    node: Node,
    min: usize,
    max: Option<usize>,
}

/// Largest repetition count accepted in `{m,n}`.
const MAX_REPEAT: usize = 1000;

struct Parser<'a> {
    chars: Vec<char>,
    pos: usize,
    src: &'a str,
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }
    fn err(&self, what: &str) -> String {
        format!("pattern `{}`: {what} at position {}", self.src, self.pos)
    }

    fn alternation(&mut self) -> Result<Vec<Vec<Item>>, String> {
        let mut alts = vec![self.sequence()?];
        while self.peek() == Some('|') {
            self.pos += 1;
            alts.push(self.sequence()?);
        }
        Ok(alts)
    }

    fn sequence(&mut self) -> Result<Vec<Item>, String> {
        let mut items = Vec::new();
        while let Some(c) = self.peek() {
            if c == '|' || c == ')' {
                break;
            }
            let node = self.atom()?;
            let (min, max) = self.quantifier()?;
            items.push(Item { node, min, max });
        }
        Ok(items)
    }

    fn atom(&mut self) -> Result<Node, String> {
        let c = self.peek().ok_or_else(|| self.err("unexpected end"))?;
        self.pos += 1;
        Ok(match c {
            '(' => {
                if self.peek() == Some('?') {
                    if self.chars.get(self.pos + 1) == Some(&':') {
                        self.pos += 2;
                    } else {
                        return Err(self.err("unsupported group syntax `(?`"));
                    }
                }
                let alts = self.alternation()?;
                if self.peek() != Some(')') {
                    return Err(self.err("missing `)`"));
                }
                self.pos += 1;
                Node::Group(alts)
            }
            '[' => self.class()?,
            '.' => Node::Any,
            '^' => Node::Start,
            '$' => Node::End,
            '\\' => self.escape()?,
            '*' | '+' | '?' => return Err(self.err("nothing to repeat")),
            other => Node::Char(other),
        })
    }

    fn escape(&mut self) -> Result<Node, String> {
        let c = self.peek().ok_or_else(|| self.err("trailing `\\`"))?;
        self.pos += 1;
        let class = |ranges: Vec<(char, char)>, negated| Node::Class { ranges, negated };
        Ok(match c {
            'd' => class(DIGIT.to_vec(), false),
            'D' => class(DIGIT.to_vec(), true),
            'w' => class(WORD.to_vec(), false),
            'W' => class(WORD.to_vec(), true),
            's' => class(SPACE.to_vec(), false),
            'S' => class(SPACE.to_vec(), true),
            c if c.is_ascii_alphanumeric() => return Err(self.err(&format!("unsupported escape `\\{c}`"))),
            c => Node::Char(c),
        })
    }

    fn class(&mut self) -> Result<Node, String> {
        let mut negated = false;
        if self.peek() == Some('^') {
            negated = true;
            self.pos += 1;
        }
        let mut ranges = Vec::new();
        let mut first = true;
        loop {
            let c = self.peek().ok_or_else(|| self.err("missing `]`"))?;
            self.pos += 1;
            if c == ']' && !first {
                break;
            }
            first = false;
            let lo = if c == '\\' {
                let e = self.peek().ok_or_else(|| self.err("trailing `\\`"))?;
                self.pos += 1;
                match e {
                    'd' => {
                        ranges.extend_from_slice(&DIGIT);
                        continue;
                    }
                    'w' => {
                        ranges.extend_from_slice(&WORD);
                        continue;
                    }
                    's' => {
                        ranges.extend_from_slice(&SPACE);
                        continue;
                    }
                    e if e.is_ascii_alphanumeric() => return Err(self.err(&format!("unsupported escape `\\{e}`"))),
                    e => e,
                }
            } else {
                c
            };
            if self.peek() == Some('-') && self.chars.get(self.pos + 1).is_some_and(|&n| n != ']') {
                let hi = self.chars[self.pos + 1];
                self.pos += 2;
                if hi < lo {
                    return Err(self.err("bad character range"));
                }
                ranges.push((lo, hi));
            } else {
                ranges.push((lo, lo));
            }
        }
        Ok(Node::Class { ranges, negated })
    }

    fn quantifier(&mut self) -> Result<(usize, Option<usize>), String> {
        let q = match self.peek() {
            Some('*') => (0, None),
            Some('+') => (1, None),
            Some('?') => (0, Some(1)),
            Some('{') => match self.braces() {
                Some((q, len)) => {
                    self.pos += len - 1;
                    q
                }
                None => return Ok((1, Some(1))),
            },
            _ => return Ok((1, Some(1))),
        };
        self.pos += 1;
        if self.peek() == Some('?') {
            self.pos += 1; // lazy: the same strings match
        }
        if q.0 > MAX_REPEAT || q.1.is_some_and(|m| m > MAX_REPEAT || m < q.0) {
            return Err(self.err("bad repetition count"));
        }
        Ok(q)
    }

    /// `{m}`, `{m,}`, `{m,n}` at the current position: the bounds and the length in chars, or
    /// `None` when the `{` is a literal (as in Python).
    fn braces(&self) -> Option<((usize, Option<usize>), usize)> {
        let rest: String = self.chars[self.pos..].iter().collect();
        let end = rest.find('}')?;
        let inner = &rest[1..end];
        let bounds = match inner.split_once(',') {
            None => {
                let n = inner.parse().ok()?;
                (n, Some(n))
            }
            Some((a, "")) => (a.parse().ok()?, None),
            Some((a, b)) => (a.parse().ok()?, Some(b.parse().ok()?)),
        };
        Some((bounds, rest[..=end].chars().count()))
    }
}

const DIGIT: [(char, char); 1] = [('0', '9')];
const WORD: [(char, char); 4] = [('a', 'z'), ('A', 'Z'), ('0', '9'), ('_', '_')];
const SPACE: [(char, char); 4] = [(' ', ' '), ('\t', '\r'), ('\u{b}', '\u{c}'), ('\u{85}', '\u{85}')];

fn emit_node(prog: &mut Vec<Inst>, node: &Node) {
    match node {
        Node::Char(c) => prog.push(Inst::Char(*c)),
        Node::Any => prog.push(Inst::Any),
        Node::Class { ranges, negated } => prog.push(Inst::Class { ranges: ranges.clone(), negated: *negated }),
        Node::Start => prog.push(Inst::Start),
        Node::End => prog.push(Inst::End),
        Node::Group(alts) => emit_alts(prog, alts),
    }
}

fn emit_alts(prog: &mut Vec<Inst>, alts: &[Vec<Item>]) {
    let Some((last, init)) = alts.split_last() else { return };
    let mut jumps = Vec::new();
    for seq in init {
        let split = prog.len();
        prog.push(Inst::Split(split + 1, 0));
        emit_seq(prog, seq);
        jumps.push(prog.len());
        prog.push(Inst::Jmp(0));
        let next = prog.len();
        prog[split] = Inst::Split(split + 1, next);
    }
    emit_seq(prog, last);
    let end = prog.len();
    for j in jumps {
        prog[j] = Inst::Jmp(end);
    }
}

fn emit_seq(prog: &mut Vec<Inst>, seq: &[Item]) {
    for item in seq {
        for _ in 0..item.min {
            emit_node(prog, &item.node);
        }
        match item.max {
            None => {
                let split = prog.len();
                prog.push(Inst::Split(split + 1, 0));
                emit_node(prog, &item.node);
                prog.push(Inst::Jmp(split));
                let end = prog.len();
                prog[split] = Inst::Split(split + 1, end);
            }
            Some(max) => {
                let mut splits = Vec::new();
                for _ in item.min..max {
                    splits.push(prog.len());
                    prog.push(Inst::Split(0, 0));
                    emit_node(prog, &item.node);
                }
                let end = prog.len();
                for s in splits {
                    prog[s] = Inst::Split(s + 1, end);
                }
            }
        }
    }
}

impl Regex {
    /// Compiles `pattern`; errors say what is not supported.
    pub(crate) fn new(pattern: &str) -> Result<Regex, String> {
        let mut p = Parser { chars: pattern.chars().collect(), pos: 0, src: pattern };
        let alts = p.alternation()?;
        if p.pos != p.chars.len() {
            return Err(p.err("unbalanced `)`"));
        }
        let mut prog = Vec::new();
        emit_alts(&mut prog, &alts);
        prog.push(Inst::Match);
        Ok(Regex { prog })
    }

    /// Python `re.match`: a match starting at the beginning of `text` (not necessarily
    /// reaching its end unless the pattern says `$`).
    pub(crate) fn matches_at_start(&self, text: &str) -> bool {
        let chars: Vec<char> = text.chars().collect();
        let mut current = Vec::new();
        let mut seen = vec![usize::MAX; self.prog.len()];
        if self.add(&mut current, &mut seen, 0, 0, chars.len()) {
            return true;
        }
        for (i, &c) in chars.iter().enumerate() {
            let mut next = Vec::new();
            for &pc in &current {
                let step = match &self.prog[pc] {
                    Inst::Char(x) => *x == c,
                    Inst::Any => c != '\n',
                    Inst::Class { ranges, negated } => ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated,
                    _ => false,
                };
                if step && self.add(&mut next, &mut seen, pc + 1, i + 1, chars.len()) {
                    return true;
                }
            }
            if next.is_empty() {
                return false;
            }
            current = next;
        }
        false
    }

    /// Adds `pc` and its epsilon closure at text position `pos`; true when `Match` is reached.
    fn add(&self, list: &mut Vec<usize>, seen: &mut [usize], pc: usize, pos: usize, len: usize) -> bool {
        if seen[pc] == pos {
            return false;
        }
        seen[pc] = pos;
        match self.prog[pc] {
            Inst::Match => true,
            Inst::Jmp(t) => self.add(list, seen, t, pos, len),
            Inst::Split(a, b) => self.add(list, seen, a, pos, len) | self.add(list, seen, b, pos, len),
            Inst::Start => pos == 0 && self.add(list, seen, pc + 1, pos, len),
            Inst::End => pos == len && self.add(list, seen, pc + 1, pos, len),
            _ => {
                list.push(pc);
                false
            }
        }
    }
}

/// Whether PEFT pattern `key` selects `module` (`re.match(rf"(.*\.)?({key})$", module)`).
pub(crate) fn peft_key_matches(key: &str, module: &str) -> Result<bool, String> {
    Ok(Regex::new(&format!(r"(.*\.)?({key})$"))?.matches_at_start(module))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_patterns_follow_python_re() {
        let m = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
        assert_eq!(peft_key_matches("to_q", m), Ok(true));
        assert_eq!(peft_key_matches("attn1.to_q", m), Ok(true));
        assert_eq!(peft_key_matches("q", m), Ok(false), "must match whole dotted components");
        assert_eq!(peft_key_matches("n1.to_q", m), Ok(false));
        assert_eq!(peft_key_matches(m, m), Ok(true));
        assert_eq!(peft_key_matches(r"down_blocks\.\d+\..*to_[qk]", m), Ok(true));
        assert_eq!(peft_key_matches("to_(k|v)", m), Ok(false));
        assert_eq!(peft_key_matches("to_(q|v)", m), Ok(true));
        assert_eq!(peft_key_matches("attn[12].to_q", m), Ok(true));
        assert_eq!(peft_key_matches("blocks.0.a{0,1}ttn1.to_q", m), Ok(false));
        assert_eq!(peft_key_matches(".*blocks.0.a{0,1}ttn1.to_q", m), Ok(true));
        assert_eq!(peft_key_matches("x{2}", "xx"), Ok(true));
        assert_eq!(peft_key_matches("x{2}", "xxx"), Ok(false));
        assert!(peft_key_matches("(?=a)", m).is_err());
    }
}
