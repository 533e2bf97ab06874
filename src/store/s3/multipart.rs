//! Upload sessions as S3 multipart uploads: new bytes are `UploadPart`, copied ranges of the
//! base version are `UploadPartCopy` with `x-amz-copy-source-if-match` (so a part is never
//! copied from another version), and the commit is `CompleteMultipartUpload` under the
//! write's condition. S3's limits hold here: parts of 5 MiB to 5 GiB except the last, at
//! most 10,000 (the planner sizes parts from `Capabilities::min_part_size`; S3 itself
//! refuses a small part at the commit, with `EntityTooSmall`).

use std::time::SystemTime;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};

use super::error::map;
use super::{MAX_PART, MAX_PARTS, S3Store, conditional};
use crate::store::{ETag, ObjectMeta, PartReceipt, PartSource, StoreError, StoreResult, UploadId, WriteCondition};

impl S3Store {
    pub(super) async fn begin_multipart(&self, path: &str, base: Option<ETag>) -> StoreResult<UploadId> {
        let key = self.keys.object(path);
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
            .map_err(|e| map("CreateMultipartUpload", &key, e))?;
        let id = out
            .upload_id()
            .filter(|u| !u.is_empty())
            .ok_or_else(|| StoreError::Protocol(format!("CreateMultipartUpload {key}: no UploadId")))?
            .to_string();
        self.uploads.lock().insert(id.clone(), base);
        Ok(UploadId {
            path: path.to_string(),
            id,
        })
    }

    pub(super) async fn multipart_part(&self, id: &UploadId, number: u32, src: PartSource) -> StoreResult<PartReceipt> {
        if number == 0 || number > MAX_PARTS {
            return Err(StoreError::Unsupported("part numbers beyond 1..=10,000"));
        }
        let key = self.keys.object(&id.path);
        match src {
            PartSource::Bytes(b) => {
                let len = b.len() as u64;
                let out = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(&key)
                    .upload_id(&id.id)
                    .part_number(number as i32)
                    .content_length(len as i64)
                    .body(ByteStream::from(b))
                    .send()
                    .await
                    .map_err(|e| map("UploadPart", &key, e))?;
                let tag = out
                    .e_tag()
                    .ok_or_else(|| StoreError::Protocol(format!("UploadPart {key}: no ETag")))?;
                Ok(PartReceipt {
                    number,
                    tag: tag.to_string(),
                    len,
                })
            }
            PartSource::CopyFromBase(r) => {
                if !self.cfg.server_side_copy {
                    return Err(StoreError::Unsupported("server-side copy (server_side_copy = false)"));
                }
                let base = self.uploads.lock().get(&id.id).cloned();
                let base = match base {
                    Some(Some(t)) => t,
                    Some(None) => return Err(StoreError::Unsupported("copy without a base version")),
                    None => return Err(StoreError::NoSuchUpload),
                };
                if r.is_empty() {
                    return Err(StoreError::RangeNotSatisfiable { size: None });
                }
                if r.end - r.start > MAX_PART {
                    // One S3 part copies at most 5 GiB; the part numbers are the planner's, so
                    // a longer copy cannot be split here.
                    return Err(StoreError::Unsupported("a copied range over 5 GiB in one part"));
                }
                let len = r.end - r.start;
                let tag = self
                    .copy_part(&key, &key, &id.id, number, &base, r.start..r.end)
                    .await?;
                Ok(PartReceipt { number, tag, len })
            }
            PartSource::Chunk(_) => Err(StoreError::Unsupported("parts by chunk hash")),
        }
    }

    /// `UploadPartCopy` of `range` of `src` (version `etag`) as part `number` of the upload
    /// `upload_id` to `dst`; returns the part's ETag.
    async fn copy_part(
        &self,
        src: &str,
        dst: &str,
        upload_id: &str,
        number: u32,
        etag: &ETag,
        range: std::ops::Range<u64>,
    ) -> StoreResult<String> {
        let out = self
            .client
            .upload_part_copy()
            .bucket(&self.bucket)
            .key(dst)
            .upload_id(upload_id)
            .part_number(number as i32)
            .copy_source(self.copy_source(src))
            .copy_source_range(format!("bytes={}-{}", range.start, range.end - 1))
            .copy_source_if_match(etag.as_str())
            .send()
            .await
            // The base is gone: the version the changes started from no longer exists.
            .map_err(|e| match map("UploadPartCopy", dst, e) {
                StoreError::NotFound => StoreError::PreconditionFailed,
                e => e,
            })?;
        out.copy_part_result()
            .and_then(|c| c.e_tag())
            .map(str::to_string)
            .ok_or_else(|| StoreError::Protocol(format!("UploadPartCopy {dst}: no ETag")))
    }

    pub(super) async fn complete_multipart(
        &self,
        id: &UploadId,
        parts: Vec<PartReceipt>,
        cond: WriteCondition,
    ) -> StoreResult<ObjectMeta> {
        let key = self.keys.object(&id.path);
        if parts.is_empty() {
            return Err(StoreError::Protocol(format!("CompleteMultipartUpload {key}: no parts")));
        }
        if !self.cfg.conditional_writes {
            self.check_by_head(&key, &cond).await?;
        }
        let size = parts.iter().map(|p| p.len).sum();
        let completed = CompletedMultipartUpload::builder()
            .set_parts(Some(
                parts
                    .iter()
                    .map(|p| {
                        CompletedPart::builder()
                            .part_number(p.number as i32)
                            .e_tag(&p.tag)
                            .build()
                    })
                    .collect(),
            ))
            .build();
        let mut req = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&key)
            .upload_id(&id.id)
            .multipart_upload(completed);
        if self.cfg.conditional_writes {
            match &cond {
                WriteCondition::None => {}
                WriteCondition::Matches(t) => req = req.if_match(t.as_str()),
                WriteCondition::Absent => req = req.if_none_match("*"),
            }
        }
        let out = req
            .send()
            .await
            .map_err(|e| conditional(&cond, map("CompleteMultipartUpload", &key, e)))?;
        self.uploads.lock().remove(&id.id);
        Ok(ObjectMeta {
            size,
            mtime: SystemTime::now(),
            etag: out.e_tag().filter(|t| !t.is_empty()).map(ETag::new),
            max_age: None,
        })
    }

    pub(super) async fn abort_multipart(&self, id: &UploadId) -> StoreResult<()> {
        let key = self.keys.object(&id.path);
        self.uploads.lock().remove(&id.id);
        self.client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(&key)
            .upload_id(&id.id)
            .send()
            .await
            .map_err(|e| map("AbortMultipartUpload", &key, e))?;
        Ok(())
    }

    /// A server-side copy of an object larger than `CopyObject` takes (5 GiB): a multipart
    /// upload of `UploadPartCopy` parts, all from version `etag`.
    pub(super) async fn copy_large(&self, src: &str, dst: &str, etag: &ETag, size: u64) -> StoreResult<()> {
        let part = (1u64 << 30).max(size.div_ceil(MAX_PARTS as u64));
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(dst)
            .send()
            .await
            .map_err(|e| map("CreateMultipartUpload", dst, e))?;
        let upload_id = out
            .upload_id()
            .ok_or_else(|| StoreError::Protocol(format!("CreateMultipartUpload {dst}: no UploadId")))?
            .to_string();
        let result = async {
            let mut parts = Vec::new();
            let mut at = 0u64;
            let mut number = 1u32;
            while at < size {
                let end = (at + part).min(size);
                let tag = self.copy_part(src, dst, &upload_id, number, etag, at..end).await?;
                parts.push(CompletedPart::builder().part_number(number as i32).e_tag(tag).build());
                at = end;
                number += 1;
            }
            self.client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(dst)
                .upload_id(&upload_id)
                .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
                .send()
                .await
                .map_err(|e| map("CompleteMultipartUpload", dst, e))?;
            Ok::<(), StoreError>(())
        }
        .await;
        if result.is_err() {
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(dst)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result
    }
}
