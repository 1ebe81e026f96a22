//! Arrow schemas and Parquet files for what people query later: one file per window,
//! readable by pyarrow, DuckDB or polars. Schemas are documented in `schemas/round.md` (ledger) and
//! `schemas/scores.md` (validator scores).

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Float64Array, StringArray, TimestampMillisecondArray, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

/// What became of one miner's shard in one window: the ledger's and the score table's
/// `verdict` column. Its string forms are part of both formats (`round.md`, `scores.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Verified and merged (possibly clipped: see the reason).
    Accepted,
    /// Verified and refused; the reason code says why.
    Rejected,
    /// No shard at the layout key.
    Missing,
    /// The miner's store could not be read (timeout, 5xx): not the miner's verdict.
    Error,
}

impl Verdict {
    /// Every verdict, in the order the ledger documents them.
    pub const ALL: [Verdict; 4] = [
        Verdict::Accepted,
        Verdict::Rejected,
        Verdict::Missing,
        Verdict::Error,
    ];

    /// The string stored in the tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Accepted => "accepted",
            Verdict::Rejected => "rejected",
            Verdict::Missing => "missing",
            Verdict::Error => "error",
        }
    }

    /// The inverse of [`Verdict::as_str`].
    pub fn parse(s: &str) -> Option<Verdict> {
        Verdict::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Lets a reader of a table compare with the documented strings (`row.verdict == "accepted"`).
impl PartialEq<&str> for Verdict {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

fn parse_verdict(s: &str) -> Result<Verdict, parquet::errors::ParquetError> {
    Verdict::parse(s)
        .ok_or_else(|| parquet::errors::ParquetError::General(format!("unknown verdict {s:?}")))
}

/// One ledger row: what the aggregator saw of one registered miner in one window.
#[derive(Clone, Debug, PartialEq)]
pub struct LedgerRow {
    /// The window.
    pub window: u64,
    /// The miner's peer id.
    pub peer: String,
    /// An object was at the layout key (valid or not).
    pub found: bool,
    /// Its stored size.
    pub bytes: Option<u64>,
    /// When it landed by the store's clock, ms.
    pub last_modified_ms: Option<i64>,
    /// `accepted`, `rejected`, `missing` or `error` (the store failed; not the miner's verdict).
    pub verdict: Verdict,
    /// Stable reason code (`""` when accepted as is).
    pub reason: String,
    /// A human detail naming the object (stable across reruns).
    pub detail: String,
    /// The update's L2 norm, for accepted shards.
    pub norm: Option<f64>,
    /// Its merge weight (clip scale / accepted count; 0 when not merged).
    pub weight: f64,
}

/// The ledger's Arrow schema (`schemas/round.md`).
pub(crate) fn ledger_schema() -> Schema {
    Schema::new(vec![
        Field::new("window", DataType::UInt64, false),
        Field::new("peer", DataType::Utf8, false),
        Field::new("found", DataType::Boolean, false),
        Field::new("bytes", DataType::UInt64, true),
        Field::new(
            "last_modified",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            true,
        ),
        Field::new("verdict", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("detail", DataType::Utf8, false),
        Field::new("norm", DataType::Float64, true),
        Field::new("weight", DataType::Float64, false),
    ])
}

/// The ledger as Parquet bytes (zstd-compressed columns; deterministic for equal rows).
pub(crate) fn ledger_parquet(rows: &[LedgerRow]) -> Result<Vec<u8>, parquet::errors::ParquetError> {
    let cols: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.window))),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.peer.as_str()),
        )),
        Arc::new(BooleanArray::from(
            rows.iter().map(|r| r.found).collect::<Vec<_>>(),
        )),
        Arc::new(UInt64Array::from(
            rows.iter().map(|r| r.bytes).collect::<Vec<_>>(),
        )),
        Arc::new(
            TimestampMillisecondArray::from(
                rows.iter().map(|r| r.last_modified_ms).collect::<Vec<_>>(),
            )
            .with_timezone("UTC"),
        ),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.verdict.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.reason.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.detail.as_str()),
        )),
        Arc::new(Float64Array::from(
            rows.iter().map(|r| r.norm).collect::<Vec<_>>(),
        )),
        Arc::new(Float64Array::from_iter_values(
            rows.iter().map(|r| r.weight),
        )),
    ];
    write_parquet(ledger_schema(), cols)
}

/// Reads a ledger back (for `shardrop` commands and tests).
pub fn read_ledger(bytes: bytes::Bytes) -> Result<Vec<LedgerRow>, parquet::errors::ParquetError> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Float64Type, TimestampMillisecondType, UInt64Type};
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)?.build()?;
    let mut rows = Vec::new();
    for batch in reader {
        let b = batch.map_err(|e| parquet::errors::ParquetError::General(e.to_string()))?;
        let col = |name: &str| {
            b.column_by_name(name)
                .cloned()
                .ok_or_else(|| parquet::errors::ParquetError::General(format!("no column {name}")))
        };
        let (window, peer, found, bytes_c, lm, verdict, reason, detail, norm, weight) = (
            col("window")?,
            col("peer")?,
            col("found")?,
            col("bytes")?,
            col("last_modified")?,
            col("verdict")?,
            col("reason")?,
            col("detail")?,
            col("norm")?,
            col("weight")?,
        );
        for i in 0..b.num_rows() {
            let bytes_a = bytes_c.as_primitive::<UInt64Type>();
            let lm_a = lm.as_primitive::<TimestampMillisecondType>();
            let norm_a = norm.as_primitive::<Float64Type>();
            rows.push(LedgerRow {
                window: window.as_primitive::<UInt64Type>().value(i),
                peer: peer.as_string::<i32>().value(i).to_string(),
                found: found.as_boolean().value(i),
                bytes: bytes_a.is_valid(i).then(|| bytes_a.value(i)),
                last_modified_ms: lm_a.is_valid(i).then(|| lm_a.value(i)),
                verdict: parse_verdict(verdict.as_string::<i32>().value(i))?,
                reason: reason.as_string::<i32>().value(i).to_string(),
                detail: detail.as_string::<i32>().value(i).to_string(),
                norm: norm_a.is_valid(i).then(|| norm_a.value(i)),
                weight: weight.as_primitive::<Float64Type>().value(i),
            });
        }
    }
    Ok(rows)
}

/// One score row: what the validator made of one registered miner in one window. Every
/// component is kept, so anyone can recompute the rating and the weight from the table.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScoreRow {
    /// The window.
    pub window: u64,
    /// The miner's peer id.
    pub peer: String,
    /// A shard was found at the layout key (valid or not).
    pub present: bool,
    /// When its shard landed by the store's clock, ms.
    pub last_modified_ms: Option<i64>,
    /// Seconds between the store's `last_modified` and the window's end (negative: in grace).
    pub secs_before_deadline: Option<f64>,
    /// The same verdict, reason and detail as the aggregator's ledger.
    pub verdict: Verdict,
    /// The ledger's reason code.
    pub reason: String,
    /// The ledger's detail.
    pub detail: String,
    /// The update's L2 norm, for accepted shards.
    pub norm: Option<f64>,
    /// Cosine of the update with the mean of the other eligible miners' updates.
    pub agreement: Option<f64>,
    /// The most similar other miner, or `agg:W` for a past aggregate.
    pub nearest: Option<String>,
    /// Index-set overlap with `nearest` (Jaccard with a miner, containment in an aggregate).
    pub overlap: Option<f64>,
    /// Value cosine with `nearest`.
    pub similarity: Option<f64>,
    /// Flagged as a copy of `nearest`.
    pub copier: bool,
    /// The evaluator's loss before the update.
    pub loss_before: Option<f64>,
    /// The evaluator's loss after the scaled update.
    pub loss_after: Option<f64>,
    /// `loss_before − loss_after`: positive when the update helps.
    pub usefulness: Option<f64>,
    /// Why the evaluator gave no losses (never the miner's fault).
    pub eval_error: Option<String>,
    /// This window's score in [0, 1]; null when nothing could be judged (rating carried).
    pub score: Option<f64>,
    /// The rating after this window (an exponential average of scores).
    pub rating: f64,
    /// The normalised weight the validator sets for this miner.
    pub weight: f64,
}

fn ts_field(name: &str) -> Field {
    Field::new(
        name,
        DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
        true,
    )
}

/// The score table's Arrow schema (`schemas/scores.md`).
pub fn scores_schema() -> Schema {
    let f = |n: &str| Field::new(n, DataType::Float64, true);
    let s = |n: &str, null: bool| Field::new(n, DataType::Utf8, null);
    Schema::new(vec![
        Field::new("window", DataType::UInt64, false),
        s("peer", false),
        Field::new("present", DataType::Boolean, false),
        ts_field("last_modified"),
        f("secs_before_deadline"),
        s("verdict", false),
        s("reason", false),
        s("detail", false),
        f("norm"),
        f("agreement"),
        s("nearest", true),
        f("overlap"),
        f("similarity"),
        Field::new("copier", DataType::Boolean, false),
        f("loss_before"),
        f("loss_after"),
        f("usefulness"),
        s("eval_error", true),
        f("score"),
        Field::new("rating", DataType::Float64, false),
        Field::new("weight", DataType::Float64, false),
    ])
}

fn write_parquet(
    schema: Schema,
    cols: Vec<ArrayRef>,
) -> Result<Vec<u8>, parquet::errors::ParquetError> {
    let schema = Arc::new(schema);
    let batch = RecordBatch::try_new(Arc::clone(&schema), cols)
        .map_err(|e| parquet::errors::ParquetError::General(e.to_string()))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_created_by("shardrop".to_string())
        .build();
    let mut out = Vec::new();
    let mut w = ArrowWriter::try_new(&mut out, schema, Some(props))?;
    w.write(&batch)?;
    w.close()?;
    Ok(out)
}

/// The score table as Parquet bytes (deterministic for equal rows).
pub(crate) fn scores_parquet(rows: &[ScoreRow]) -> Result<Vec<u8>, parquet::errors::ParquetError> {
    let f64s = |g: fn(&ScoreRow) -> Option<f64>| -> ArrayRef {
        Arc::new(Float64Array::from(rows.iter().map(g).collect::<Vec<_>>()))
    };
    let strs = |g: fn(&ScoreRow) -> Option<&str>| -> ArrayRef {
        Arc::new(StringArray::from(rows.iter().map(g).collect::<Vec<_>>()))
    };
    let bools = |g: fn(&ScoreRow) -> bool| -> ArrayRef {
        Arc::new(BooleanArray::from(rows.iter().map(g).collect::<Vec<_>>()))
    };
    let cols: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.window))),
        strs(|r| Some(&r.peer)),
        bools(|r| r.present),
        Arc::new(
            TimestampMillisecondArray::from(
                rows.iter().map(|r| r.last_modified_ms).collect::<Vec<_>>(),
            )
            .with_timezone("UTC"),
        ),
        f64s(|r| r.secs_before_deadline),
        strs(|r| Some(r.verdict.as_str())),
        strs(|r| Some(&r.reason)),
        strs(|r| Some(&r.detail)),
        f64s(|r| r.norm),
        f64s(|r| r.agreement),
        strs(|r| r.nearest.as_deref()),
        f64s(|r| r.overlap),
        f64s(|r| r.similarity),
        bools(|r| r.copier),
        f64s(|r| r.loss_before),
        f64s(|r| r.loss_after),
        f64s(|r| r.usefulness),
        strs(|r| r.eval_error.as_deref()),
        f64s(|r| r.score),
        f64s(|r| Some(r.rating)),
        f64s(|r| Some(r.weight)),
    ];
    write_parquet(scores_schema(), cols)
}

/// Reads a score table back, checking its columns against the documented schema.
pub(crate) fn read_scores(
    bytes: bytes::Bytes,
) -> Result<Vec<ScoreRow>, parquet::errors::ParquetError> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Float64Type, TimestampMillisecondType, UInt64Type};
    let general = |m: String| parquet::errors::ParquetError::General(m);
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)?.build()?;
    let want = scores_schema();
    let mut rows = Vec::new();
    for batch in reader {
        let b = batch.map_err(|e| general(e.to_string()))?;
        for f in want.fields() {
            match b.column_by_name(f.name()) {
                Some(c) if c.data_type() == f.data_type() => {}
                _ => return Err(general(format!("column {} missing or mistyped", f.name()))),
            }
        }
        let col = |n: &str| {
            b.column_by_name(n)
                .cloned()
                .unwrap_or_else(|| b.column(0).clone())
        };
        let f = |n: &str, i: usize| {
            let c = col(n);
            let a = c.as_primitive::<Float64Type>();
            a.is_valid(i).then(|| a.value(i))
        };
        let s = |n: &str, i: usize| {
            let c = col(n);
            let a = c.as_string::<i32>();
            a.is_valid(i).then(|| a.value(i).to_string())
        };
        let t = |n: &str, i: usize| col(n).as_boolean().value(i);
        for i in 0..b.num_rows() {
            let lm = col("last_modified");
            let lm = lm.as_primitive::<TimestampMillisecondType>();
            rows.push(ScoreRow {
                window: col("window").as_primitive::<UInt64Type>().value(i),
                peer: s("peer", i).unwrap_or_default(),
                present: t("present", i),
                last_modified_ms: lm.is_valid(i).then(|| lm.value(i)),
                secs_before_deadline: f("secs_before_deadline", i),
                verdict: parse_verdict(&s("verdict", i).unwrap_or_default())?,
                reason: s("reason", i).unwrap_or_default(),
                detail: s("detail", i).unwrap_or_default(),
                norm: f("norm", i),
                agreement: f("agreement", i),
                nearest: s("nearest", i),
                overlap: f("overlap", i),
                similarity: f("similarity", i),
                copier: t("copier", i),
                loss_before: f("loss_before", i),
                loss_after: f("loss_after", i),
                usefulness: f("usefulness", i),
                eval_error: s("eval_error", i),
                score: f("score", i),
                rating: f("rating", i).unwrap_or(0.0),
                weight: f("weight", i).unwrap_or(0.0),
            });
        }
    }
    Ok(rows)
}
