//! What the store benchmarks share: the transfer limit they are measured against.

use shardrop::store::Target;

/// The transfer limit both store benchmarks compare against: plain parallel GETs (whole
/// objects, or byte ranges), bodies counted and discarded. Returns (bytes, seconds).
pub(super) async fn plain_download(
    gets: Vec<(
        Target,
        object_store::path::Path,
        Option<std::ops::Range<u64>>,
    )>,
    concurrency: usize,
) -> anyhow::Result<(u64, f64)> {
    use futures::StreamExt;
    use object_store::{GetOptions, GetRange};
    let t = std::time::Instant::now();
    let got: Vec<u64> = futures::stream::iter(gets.into_iter().map(|(target, p, r)| async move {
        let opts = GetOptions {
            range: r.map(GetRange::Bounded),
            ..Default::default()
        };
        target
            .store
            .get_opts(&p, opts)
            .await?
            .bytes()
            .await
            .map(|b| b.len() as u64)
    }))
    .buffer_unordered(concurrency.max(1))
    .collect::<Vec<_>>()
    .await
    .into_iter()
    .collect::<Result<_, _>>()
    .map_err(|e| anyhow::anyhow!("plain download: {e}"))?;
    Ok((got.iter().sum(), t.elapsed().as_secs_f64()))
}
