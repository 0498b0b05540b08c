//! sqllogictest files over a fixture capture (see `common/mod.rs`): every table, the
//! seam between the archive and the log tail, data scoping and error messages.
//!
//! `tests/slt/<reader>/*.slt` run as that reader: `auditor` sees everything, `alice`
//! reads target `payments`, `bob` target `db`, `carol` no target at all.
//! Cells print as Arrow displays them; NULL as `NULL`, an empty string as `(empty)`.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use cloudtap_query::{QueryEngine, QueryError, Reader, Scope};
use datafusion::arrow::array::{Array, RecordBatch};
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use futures::StreamExt;
use sqllogictest::{DBOutput, DefaultColumnType};

struct Db {
    engine: Arc<QueryEngine>,
    reader: Reader,
}

#[derive(Debug)]
struct SltError(String);

impl std::fmt::Display for SltError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SltError {}

impl From<QueryError> for SltError {
    fn from(e: QueryError) -> Self {
        SltError(e.to_string())
    }
}

fn cells(batch: &RecordBatch) -> Vec<Vec<String>> {
    let opts = FormatOptions::default().with_null("NULL");
    let fmts: Vec<_> = batch
        .columns()
        .iter()
        .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts).unwrap())
        .collect();
    (0..batch.num_rows())
        .map(|r| {
            fmts.iter()
                .zip(batch.columns())
                .map(|(f, c)| {
                    let s = f.value(r).to_string();
                    if s.is_empty() && !c.is_null(r) {
                        "(empty)".to_string()
                    } else {
                        s
                    }
                })
                .collect()
        })
        .collect()
}

fn column_type(t: &DataType) -> DefaultColumnType {
    match t {
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64 => DefaultColumnType::Integer,
        DataType::Float16 | DataType::Float32 | DataType::Float64 | DataType::Decimal128(..) => {
            DefaultColumnType::FloatingPoint
        }
        _ => DefaultColumnType::Text,
    }
}

#[async_trait::async_trait]
impl sqllogictest::AsyncDB for Db {
    type Error = SltError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, SltError> {
        let out = self.engine.execute(&self.reader, sql, None).await?;
        let types = out
            .schema
            .fields()
            .iter()
            .map(|f| column_type(f.data_type()))
            .collect();
        let mut rows = Vec::new();
        let mut batches = out.batches;
        while let Some(b) = batches.next().await {
            rows.extend(cells(&b?));
        }
        Ok(DBOutput::Rows { types, rows })
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "cloudtap"
    }

    async fn sleep(dur: std::time::Duration) {
        tokio::time::sleep(dur).await;
    }
}

fn reader(name: &str) -> Reader {
    let scope = match name {
        "auditor" => Scope::All,
        "alice" => Scope::Sessions {
            identity: "alice".into(),
            targets: Some(vec!["payments".into()]),
        },
        "bob" => Scope::Sessions {
            identity: "bob".into(),
            targets: Some(vec!["db".into()]),
        },
        "carol" => Scope::Sessions {
            identity: "carol".into(),
            targets: Some(vec![]),
        },
        other => panic!("tests/slt/{other}: no such reader; add it to reader() in tests/slt.rs"),
    };
    Reader {
        identity: name.into(),
        scope,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqllogictest_files() {
    let fx = common::fixture().await;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/slt");
    let mut files = Vec::new();
    for dir in std::fs::read_dir(&root).unwrap() {
        let dir = dir.unwrap().path();
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|e| e == "slt") {
                files.push((dir.file_name().unwrap().to_string_lossy().into_owned(), f));
            }
        }
    }
    files.sort();
    assert!(
        files.len() >= 4,
        "expected .slt files under {}",
        root.display()
    );
    let mut failures = Vec::new();
    for (who, file) in &files {
        let engine = fx.engine.clone();
        let r = reader(who);
        let mut runner = sqllogictest::Runner::new(move || {
            let engine = engine.clone();
            let reader = r.clone();
            async move { Ok::<_, SltError>(Db { engine, reader }) }
        });
        println!("running {} as {who}", file.display());
        if let Err(e) = runner.run_file_async(file).await {
            failures.push(format!("{}: {e}", file.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    println!("{} sqllogictest files passed", files.len());
}
