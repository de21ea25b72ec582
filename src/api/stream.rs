//! Streamed answers: a 200 whose body is produced a chunk at a time on the workers (a
//! time-lapse ZIP, a JSON array too large to build at once), sent as it is produced, with at
//! most one chunk in production and none while the connection's unsent output is above
//! [`es_net::STREAM_OUTPUT_HIGH_BYTES`] (the session keeps that rule, [`es_net::Pump`]).
//!
//! A [`Body`] knows only its content: what to read next, how to encode it, and what to answer
//! when it cannot start. The session frames it (chunked, or ended by the close for HTTP/1.0),
//! answers HEAD with the head alone, and breaks the connection off without the last chunk when
//! a body fails after its head was sent, so a client sees a truncated answer, never a short one.

use bytes::Bytes;
use es_storage::{FrameChunk, StorageError, Store};

use super::zip::ZipStream;
use super::{JsonPlan, Response, ZipPlan, ZIP_CHUNK_FRAMES};

/// What one production step made.
pub enum Produced {
    /// Body bytes (the first come after the head); `last` ends the answer.
    Data { data: Vec<u8>, last: bool },
    /// Nothing was sent yet: answer this instead of the 200.
    Refuse(Response),
    /// The head was sent and the body cannot go on (the reason, for the log).
    Broken(String),
}

/// The content of a streamed answer.
pub(crate) trait Body: Send {
    /// The 200's headers besides the framing ones.
    fn headers(&self) -> Vec<(&'static str, String)>;
    /// Reads and encodes the next chunk (on a worker thread; storage reads are allowed).
    fn produce(&mut self, store: &Store) -> Produced;
    /// How a refusal before the first byte (the workers are busy) is answered.
    fn refuse(&self, response: Response) -> Response {
        response
    }
    /// What it is, for the log ("time-lapse ZIP").
    fn what(&self) -> &'static str;
}

/// An embryo's time-lapse as a ZIP of JPEGs, [`ZIP_CHUNK_FRAMES`] frames per chunk.
pub(crate) struct ZipBody {
    plan: ZipPlan,
    next_from_ms: i64,
    run: u32,
    zip: ZipStream,
    started: bool,
}

impl ZipBody {
    pub(crate) fn new(plan: ZipPlan) -> ZipBody {
        ZipBody {
            plan,
            next_from_ms: i64::MIN,
            run: 0,
            zip: ZipStream::default(),
            started: false,
        }
    }

    fn read(&self, store: &Store) -> Result<Option<FrameChunk>, StorageError> {
        let (embryo_id, focal_plane, from_ms) = (
            &self.plan.embryo_id,
            self.plan.focal_plane,
            self.next_from_ms,
        );
        es_storage::guarded("time-lapse frames", || {
            store.read().and_then(|reader| {
                reader.frames(embryo_id, focal_plane, from_ms, i64::MAX, ZIP_CHUNK_FRAMES)
            })
        })
    }
}

impl Body for ZipBody {
    fn headers(&self) -> Vec<(&'static str, String)> {
        vec![
            ("content-type", "application/zip".into()),
            (
                "content-disposition",
                format!("attachment; filename=\"{}.zip\"", self.plan.name_prefix),
            ),
        ]
    }

    fn produce(&mut self, store: &Store) -> Produced {
        let result = self.read(store);
        // Frames before a damaged one are sent, and the chunk is not the last however short:
        // the next read starts at the damaged frame and ends the stream with its error.
        let damage_follows = matches!(&result, Ok(Some(chunk)) if chunk.damaged.is_some());
        let result = match result {
            Ok(Some(chunk)) => chunk.into_frames().map(Some),
            Ok(None) => Ok(None),
            Err(error) => Err(error),
        };
        let frames = match (result, self.started) {
            (Ok(Some(frames)), _) => frames,
            (Ok(None), false) => {
                let message = format!("embryo {} is unknown", self.plan.embryo_id);
                return Produced::Refuse(Response::error(404, "not_found", message));
            }
            (Err(error), false) => return Produced::Refuse(Response::storage(&error)),
            (Ok(None), true) => return Produced::Broken("the embryo is gone".into()),
            (Err(error), true) => return Produced::Broken(error.to_string()),
        };
        if !self.started {
            if frames.is_empty() {
                // The original answers 204 when there are no images.
                return Produced::Refuse(Response {
                    status: 204,
                    headers: Vec::new(),
                    body: Bytes::new(),
                });
            }
            self.started = true;
        }
        let mut data = Vec::new();
        let mut full = false;
        let last = !damage_follows && frames.len() < ZIP_CHUNK_FRAMES as usize;
        for frame in &frames {
            let run = self.run + 1;
            let name = format!("{}_{run:05}.jpg", self.plan.name_prefix);
            if !self.zip.fits(&name, frame.jpeg.len()) {
                full = true;
                break;
            }
            self.zip
                .entry(&name, frame.acquired_at_ms, &frame.jpeg, &mut data);
            self.run = run;
            self.next_from_ms = frame.acquired_at_ms.saturating_add(1);
        }
        if full {
            tracing::warn!(embryo = %self.plan.embryo_id, entries = self.zip.len(), "time-lapse ZIP reached the classic ZIP limits; the archive ends early");
        }
        if full || last {
            std::mem::take(&mut self.zip).finish(&mut data);
        }
        Produced::Data {
            data,
            last: full || last,
        }
    }

    fn what(&self) -> &'static str {
        "time-lapse ZIP"
    }
}

/// A JSON object whose one array is read a page at a time ([`JsonPlan`]).
pub(crate) struct JsonBody {
    plan: JsonPlan,
    cursor: u64,
    items: u64,
    started: bool,
}

impl JsonBody {
    pub(crate) fn new(plan: JsonPlan) -> JsonBody {
        JsonBody {
            plan,
            cursor: 0,
            items: 0,
            started: false,
        }
    }
}

impl Body for JsonBody {
    fn headers(&self) -> Vec<(&'static str, String)> {
        vec![("content-type", "application/json".into())]
    }

    fn produce(&mut self, store: &Store) -> Produced {
        let read = self.plan.read.clone();
        let cursor = self.cursor;
        let (items, next) = match es_storage::guarded("a streamed answer", || read(store, cursor)) {
            Ok(page) => page,
            Err(error) if !self.started => {
                return Produced::Refuse((self.plan.render_error)(Response::storage(&error)))
            }
            Err(error) => return Produced::Broken(error.to_string()),
        };
        let mut data = Vec::new();
        if !self.started {
            self.started = true;
            data.extend_from_slice(self.plan.open.as_bytes());
        }
        for item in &items {
            if self.items > 0 {
                data.push(b',');
            }
            // A Value always serialises.
            data.extend_from_slice(&serde_json::to_vec(item).unwrap_or_default());
            self.items += 1;
        }
        let last = next.is_none();
        if last {
            data.extend_from_slice(self.plan.close.as_bytes());
            data.push(b'\n');
        }
        self.cursor = next.unwrap_or(self.cursor);
        Produced::Data { data, last }
    }

    fn refuse(&self, response: Response) -> Response {
        (self.plan.render_error)(response)
    }

    fn what(&self) -> &'static str {
        "streamed answer"
    }
}
