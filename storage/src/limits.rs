//! Bounds on what a write request may carry. Input outside them is refused with
//! `WriteError::InvalidInput` before anything is written.

/// Serial numbers, dish ids, names, embryo ids, treatment names, channel names, secrets.
pub const TEXT_BYTES_MAX: usize = 128;
pub const FOCAL_PLANE_MIN: i32 = -1000;
pub const FOCAL_PLANE_MAX: i32 = 1000;
pub const WELL_MIN: u32 = 1;
pub const WELL_MAX: u32 = 1024;
pub const WELLS_PER_DISH_MAX: usize = 1024;
pub const JPEG_BYTES_MIN: usize = 1;
pub const JPEG_BYTES_MAX: usize = 16 * 1024 * 1024;
pub const TELEMETRY_SAMPLES_PER_OP_MAX: usize = 10_000;
/// Alarms in one telemetry request.
pub const ALARMS_PER_OP_MAX: usize = 1024;
/// An alarm's readable text, bytes.
pub const ALARM_TEXT_BYTES_MAX: usize = 1024;
/// Queue ids one `ImsRemove` may name.
pub const IMS_REMOVE_IDS_MAX: usize = 100_000;
/// Queue records one `ims_batch` read returns at most.
pub const IMS_BATCH_RECORDS_MAX: u32 = 10_000;
/// Change-log entries pruned per group commit at most, so pruning never makes a batch slow.
pub const PRUNE_CHANGES_PER_BATCH_MAX: u64 = 1024;
/// Upper bound of the `limit` of paginated reads (`changes_after`, `list_patients`).
pub const READ_ROWS_MAX: u32 = 10_000;
/// Free-text comments on treatments and embryos, and audited attempts.
pub const COMMENT_BYTES_MAX: usize = 4096;
pub const USER_NAME_BYTES_MAX: usize = 64;
/// An argon2id PHC string is about 100 bytes; anything much longer is not one.
pub const PASSWORD_HASH_BYTES_MAX: usize = 256;
/// Annotations one embryo may carry.
pub const ANNOTATIONS_PER_EMBRYO_MAX: u64 = 1000;
/// Latest instant accepted in a client-given time (Unix ms): the year 2286.
pub const INSTANT_MS_MAX: i64 = 10_000_000_000_000;
/// Embryos one transfer may name.
pub const EMBRYOS_PER_TRANSFER_MAX: usize = 8;
/// Gestational sacs or fetal heartbeats reported for one transfer.
pub const OUTCOME_COUNT_MAX: u32 = 16;
/// Idempotency records pruned per group commit at most.
pub const PRUNE_IDEMPOTENCY_PER_BATCH_MAX: u64 = 256;
/// Scores (one per model) one embryo may carry.
pub const SCORES_PER_EMBRYO_MAX: u64 = 64;
/// Model results one embryo may have (one per model).
pub const MODEL_RESULTS_PER_EMBRYO_MAX: u64 = 64;
/// Points of one embryo's activity curve (a week at one acquisition every 10 minutes is about
/// 1,000); later acquisitions are not analysed.
pub const ACTIVITY_POINTS_PER_EMBRYO_MAX: usize = 4000;
/// Curves one `ActivityRecorded` may update.
pub const ACTIVITY_CURVES_PER_OP_MAX: usize = 256;

/// Source addresses whose failed logins are tracked per user (`login_failures`); past it the
/// least recent is forgotten.
pub const LOGIN_ADDRESSES_PER_USER_MAX: usize = 64;

/// A `PatientIDx` a patient comes with (`<site>_<serial day>`): letters, digits, `_`, `.`, `-`.
pub const PATIENT_IDX_BYTES_MAX: usize = 64;
/// A dish's fertilization method (`ICSI`, `IVF`, ...).
pub const FERTILIZATION_METHOD_BYTES_MAX: usize = 32;
/// An embryo's label (`AA1`).
pub const EMBRYO_LABEL_BYTES_MAX: usize = 32;
