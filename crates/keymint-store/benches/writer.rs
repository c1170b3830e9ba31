//! The SQLite store's writer alone: one durable issuance (lease row and its
//! audit event, hash-chained, committed) at a time, and many at once, which
//! the single writer batches into one transaction.
//!
//! ```sh
//! cargo bench -p keymint-store --bench writer
//! ```
#![allow(clippy::unwrap_used, reason = "a benchmark")]

use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use keymint_core::model::LeaseState;
use keymint_store::conformance::{T0, issue, start, task};
use keymint_store::{SqliteStore, Store};

fn writer(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&dir.path().join("keymint.db")).unwrap());
    let t = rt.block_on(start(&*store, task("bench", "demo", None, T0, 86_400)));
    let mut group = c.benchmark_group("store_writer_issue");
    for in_flight in [1usize, 64] {
        group.throughput(Throughput::Elements(in_flight as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(in_flight),
            &in_flight,
            |b, &n| {
                b.to_async(&rt).iter(|| {
                    let (store, t) = (Arc::clone(&store), t.clone());
                    async move {
                        let mut all = Vec::with_capacity(n);
                        for _ in 0..n {
                            let (store, t) = (Arc::clone(&store), t.clone());
                            all.push(tokio::spawn(async move {
                                issue(&*store, &t, LeaseState::Active, T0, 3600).await
                            }));
                        }
                        for h in all {
                            h.await.unwrap();
                        }
                    }
                });
            },
        );
    }
    group.finish();
}

criterion_group!(benches, writer);
criterion_main!(benches);
