//! `portrait.v1.Ingest`.

use std::sync::Arc;

use portrait_proto::v1::ingest_server::Ingest;
use portrait_proto::v1::{ShardWrite, WriteRequest, WriteResponse};
use tonic::{Request, Response, Status, Streaming};

use super::convert::events_from_pb;
use crate::node::Node;

pub struct IngestService {
    node: Arc<Node>,
}

impl IngestService {
    pub fn new(node: Arc<Node>) -> Self {
        IngestService { node }
    }

    async fn write_one(&self, req: WriteRequest) -> Result<WriteResponse, crate::error::Error> {
        let events = events_from_pb(req.events)?;
        let written = self.node.write(events).await?;
        let shards = written
            .shards
            .into_iter()
            .map(|s| ShardWrite {
                shard: s.shard,
                log_index: s.log_index,
                applied: s.counts.applied,
                duplicates: s.counts.duplicates,
                expired: s.counts.expired,
            })
            .collect();
        Ok(WriteResponse {
            applied: written.counts.applied,
            duplicates: written.counts.duplicates,
            expired: written.counts.expired,
            log_index: written.log_index,
            batches: 1,
            shards,
        })
    }
}

#[tonic::async_trait]
impl Ingest for IngestService {
    async fn write(&self, request: Request<WriteRequest>) -> Result<Response<WriteResponse>, Status> {
        Ok(Response::new(self.write_one(request.into_inner()).await?))
    }

    async fn write_stream(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        let grant = request.extensions().get::<super::auth::Grant>().cloned();
        let mut stream = request.into_inner();
        let mut total = WriteResponse::default();
        loop {
            // A batch that cannot be read (too large, malformed) ends the
            // stream; the ones before it were applied, as the message says.
            let batch = match stream.message().await {
                Ok(Some(batch)) => batch,
                Ok(None) => break,
                Err(status) => return Err(in_batch(total.batches, status)),
            };
            super::auth::Grant::recheck(grant.as_ref()).map_err(|e| in_batch(total.batches, e))?;
            let resp = self.write_one(batch).await.map_err(|e| in_batch(total.batches, e.into()))?;
            // A stream has no length bound: the totals stop at their maximum.
            total.applied = total.applied.saturating_add(resp.applied);
            total.duplicates = total.duplicates.saturating_add(resp.duplicates);
            total.expired = total.expired.saturating_add(resp.expired);
            total.log_index = resp.log_index;
            merge_shards(&mut total.shards, resp.shards);
            total.batches = total.batches.saturating_add(1);
        }
        Ok(Response::new(total))
    }
}

/// Adds one batch's per-shard counts to a stream's: per shard, the counts
/// summed (saturating, as the totals) and the latest log index, in shard
/// order.
fn merge_shards(total: &mut Vec<ShardWrite>, batch: Vec<ShardWrite>) {
    for part in batch {
        match total.iter_mut().find(|s| s.shard == part.shard) {
            Some(s) => {
                s.applied = s.applied.saturating_add(part.applied);
                s.duplicates = s.duplicates.saturating_add(part.duplicates);
                s.expired = s.expired.saturating_add(part.expired);
                s.log_index = s.log_index.max(part.log_index);
            }
            None => total.push(part),
        }
    }
    total.sort_by_key(|s| s.shard);
}

/// A `WriteStream` failure at batch `n`, saying the batches before it were applied.
fn in_batch(n: u32, status: Status) -> Status {
    let message = format!("batch {n} (earlier batches were applied): {}", status.message());
    Status::with_metadata(status.code(), message, status.metadata().clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streams_shard_counts_add_up_to_its_totals() {
        let part = |shard, log_index, applied, duplicates| ShardWrite {
            shard,
            log_index,
            applied,
            duplicates,
            expired: 0,
        };
        let mut total = Vec::new();
        merge_shards(&mut total, vec![part(3, 10, 2, 0), part(1, 7, 1, 0)]);
        merge_shards(&mut total, vec![part(3, 12, 1, 1), part(2, 4, 5, 0)]);
        assert_eq!(total, vec![part(1, 7, 1, 0), part(2, 4, 5, 0), part(3, 12, 3, 1)]);
    }
}
