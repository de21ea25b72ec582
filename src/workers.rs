//! A small pool of threads for blocking work the event loops must not do: password hashing
//! and storage reads that may touch the disk (images, time-lapse chunks). Jobs wait in one
//! bounded FIFO queue, so a long playback (one chunk queued at a time) cannot starve the
//! other viewers' requests; when the queue is full, the caller answers `busy`.

use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::Mutex;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;

pub type Job = Box<dyn FnOnce() + Send + 'static>;

#[derive(Clone)]
pub struct Workers {
    inner: Arc<Inner>,
}

struct Inner {
    sender: Mutex<Option<Sender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Workers {
    /// Starts `threads` threads (at least 1) sharing a queue of `queue_max` jobs.
    pub fn start(name: &str, threads: usize, queue_max: usize) -> std::io::Result<Workers> {
        let (sender, receiver) = crossbeam_channel::bounded::<Job>(queue_max.max(1));
        let mut handles = Vec::new();
        for index in 0..threads.max(1) {
            let receiver: Receiver<Job> = receiver.clone();
            let handle = std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || {
                    while let Ok(job) = receiver.recv() {
                        if catch_unwind(AssertUnwindSafe(job)).is_err() {
                            tracing::error!("a worker job panicked");
                        }
                    }
                })?;
            handles.push(handle);
        }
        Ok(Workers {
            inner: Arc::new(Inner {
                sender: Mutex::new(Some(sender)),
                threads: Mutex::new(handles),
            }),
        })
    }

    /// Queues `job`; hands it back when the queue is full or the pool stopped.
    pub fn try_run(&self, job: Job) -> Result<(), Job> {
        let guard = self.inner.sender.lock();
        let Some(sender) = guard.as_ref() else {
            return Err(job);
        };
        match sender.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => Err(job),
        }
    }

    /// Runs what is queued, then stops the threads. Idempotent.
    pub fn shutdown(&self) {
        drop(self.inner.sender.lock().take());
        let threads = std::mem::take(&mut *self.inner.threads.lock());
        for thread in threads {
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_and_a_full_queue_hands_the_job_back() {
        let workers = Workers::start("test-worker", 1, 1).unwrap();
        let (gate_tx, gate_rx) = crossbeam_channel::bounded::<()>(0);
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let blocker = done_tx.clone();
        workers
            .try_run(Box::new(move || {
                gate_rx.recv().unwrap();
                blocker.send(1).unwrap();
            }))
            .ok()
            .unwrap();
        // The thread holds the first job; one more fits in the queue, the next does not.
        let mut queued = 0;
        for value in 2..10 {
            let sender = done_tx.clone();
            if workers
                .try_run(Box::new(move || sender.send(value).unwrap()))
                .is_ok()
            {
                queued += 1;
            }
        }
        assert!(queued <= 2, "{queued} jobs queued in a queue of 1");
        gate_tx.send(()).unwrap();
        workers.shutdown();
        drop(done_tx);
        let ran: Vec<i32> = done_rx.iter().collect();
        assert_eq!(ran.len(), 1 + queued);
        assert!(workers.try_run(Box::new(|| {})).is_err(), "stopped");
    }
}
