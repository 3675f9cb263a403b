//! Training queries: the JSONL query-file loader and the bundled default set
//! (`assets/queries.jsonl`, general reasoning questions written for this project: word
//! problems, logic puzzles, planning, everyday reasoning; no answers).
//!
//! A query file has one JSON object per line with the query text in a string field named
//! `query`, `instruction` or `prompt` (looked up in that order, so Magpie- and Alpaca-style
//! files load as they are) and an optional string `id`. A line without `id` gets
//! `line-<n>` (its 1-based line number). Blank lines are skipped. A malformed line, an
//! empty query, a duplicate id, or a file without any query is an error naming the file and
//! the line.

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

/// The bundled query set, one `{"id", "query"}` object per line.
pub const BUNDLED_QUERIES: &str = include_str!("../../assets/queries.jsonl");

/// The name errors use for the bundled set.
pub const BUNDLED_QUERIES_NAME: &str = "assets/queries.jsonl (bundled)";

/// One training query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Its id (from the file, or `line-<n>`).
    pub id: String,
    /// The query text.
    pub query: String,
}

/// The fields a query text may come from, in order of preference.
const TEXT_FIELDS: [&str; 3] = ["query", "instruction", "prompt"];

/// Parses query-file text; `source` names it in errors.
pub fn parse_queries(text: &str, source: &str) -> Result<Vec<Query>> {
    let mut out = Vec::new();
    let mut ids: HashMap<String, usize> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let q = parse_line(line, n).with_context(|| format!("{source}: line {n}"))?;
        if let Some(first) = ids.insert(q.id.clone(), n) {
            bail!(
                "{source}: line {n}: id '{}' already used on line {first}",
                q.id
            );
        }
        out.push(q);
    }
    if out.is_empty() {
        bail!("{source}: no queries (the file is empty)");
    }
    Ok(out)
}

fn parse_line(line: &str, n: usize) -> Result<Query> {
    let v: Value = serde_json::from_str(line).context("not valid JSON")?;
    let obj = v.as_object().context("expected a JSON object")?;
    let Some((field, text)) = TEXT_FIELDS.iter().find_map(|&f| obj.get(f).map(|t| (f, t))) else {
        bail!("missing a 'query' (or 'instruction' or 'prompt') field");
    };
    let text = text
        .as_str()
        .with_context(|| format!("'{field}' must be a string"))?;
    if text.trim().is_empty() {
        bail!("'{field}' is empty");
    }
    let id = match obj.get("id") {
        None => format!("line-{n}"),
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => bail!("'id' must be a non-empty string"),
    };
    Ok(Query {
        id,
        query: text.to_string(),
    })
}

/// Reads a query file.
pub fn load_queries(path: &Path) -> Result<Vec<Query>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_queries(&text, &path.display().to_string())
}

/// The bundled query set.
pub fn bundled_queries() -> Result<Vec<Query>> {
    parse_queries(BUNDLED_QUERIES, BUNDLED_QUERIES_NAME)
}

/// `path`'s queries, or the bundled set when `path` is `None`.
pub fn load_queries_or_bundled(path: Option<&Path>) -> Result<Vec<Query>> {
    match path {
        Some(p) => load_queries(p),
        None => bundled_queries(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn bundled_set_has_many_distinct_queries() {
        let qs = bundled_queries().unwrap();
        assert!(qs.len() >= 72, "{}", qs.len());
        let distinct: HashSet<&str> = qs.iter().map(|q| q.query.as_str()).collect();
        assert!(distinct.len() >= 64);
        assert_eq!(distinct.len(), qs.len());
        assert_eq!(qs[0].id, "q001");
        assert!(
            qs.iter()
                .all(|q| q.query.len() > 20 && q.id.starts_with('q'))
        );
        assert_eq!(load_queries_or_bundled(None).unwrap(), qs);
    }

    #[test]
    fn field_names_ids_and_blank_lines() {
        let text = "{\"id\": \"a\", \"query\": \"Q one\"}\n\n   \n\
                    {\"instruction\": \"Q two\", \"output\": \"ignored\"}\n\
                    {\"prompt\": \"Q three\", \"id\": \"c\"}\n\
                    {\"query\": \"Q four\", \"instruction\": \"not this\"}\n";
        let qs = parse_queries(text, "t.jsonl").unwrap();
        let got: Vec<(&str, &str)> = qs
            .iter()
            .map(|q| (q.id.as_str(), q.query.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("a", "Q one"),
                ("line-4", "Q two"),
                ("c", "Q three"),
                ("line-6", "Q four")
            ]
        );
    }

    #[test]
    fn errors_name_file_and_line() {
        let cases = [
            (
                "{\"query\": \"ok\"}\n{\"query\": \"x\"\n",
                "line 2",
                "not valid JSON",
            ),
            ("{\"query\": \"ok\"}\n\n[1, 2]\n", "line 3", "JSON object"),
            ("{\"text\": \"no field\"}\n", "line 1", "missing a 'query'"),
            ("{\"query\": 5}\n", "line 1", "must be a string"),
            ("{\"query\": \"  \"}\n", "line 1", "is empty"),
            ("{\"query\": \"a\", \"id\": 3}\n", "line 1", "'id'"),
            (
                "{\"query\": \"a\", \"id\": \"x\"}\n{\"query\": \"b\", \"id\": \"x\"}\n",
                "line 2",
                "line 1",
            ),
            ("", "q.jsonl", "no queries"),
            ("\n  \n", "q.jsonl", "no queries"),
        ];
        for (text, at, what) in cases {
            let e = format!("{:#}", parse_queries(text, "q.jsonl").unwrap_err());
            assert!(e.contains("q.jsonl"), "{e}");
            assert!(e.contains(at) && e.contains(what), "{text:?}: {e}");
        }
    }

    #[test]
    fn loads_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mine.jsonl");
        std::fs::write(&path, "{\"query\": \"What is 2+2?\"}\n").unwrap();
        let qs = load_queries_or_bundled(Some(&path)).unwrap();
        assert_eq!(
            qs,
            [Query {
                id: "line-1".into(),
                query: "What is 2+2?".into()
            }]
        );
        std::fs::write(&path, "").unwrap();
        let e = load_queries(&path).unwrap_err().to_string();
        assert!(e.contains("mine.jsonl") && e.contains("no queries"), "{e}");
        assert!(load_queries(&dir.path().join("missing.jsonl")).is_err());
    }
}
