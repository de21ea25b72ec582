//! Applying write operations inside the writer's one write transaction.
//!
//! Every operation runs in two phases: *check* (reads only; any `WriteError` returns here, so
//! a refused operation writes nothing) and *apply* (writes; only a redb error can fail it, and
//! that aborts the whole batch). The outer `Result` of each method is that fatal
//! `StorageError`; the inner one is the operation's own result (`ops::Applied`).

use crate::error::{HelloRefusal, ImageRefusal, StorageError, UnknownInstrument, WriteError};
use crate::model::ChangeEntity;
use crate::ops::{
    AlarmInput, Applied, ConfirmInstrumentSecret, DishRegistered, DishRegistration, Enrolment,
    ImageStored, ImsQueueing, ImsRemove, ImsRemoved, InstrumentAccepted, InstrumentHello,
    Operation, PatientRef, PutImage, PutTelemetry, RegisterDish, ResetInstrumentSecret,
    SecretConfirmed, SecretReset, TelemetrySample, TelemetryStored,
};
use crate::tables::{
    self, decode, encode, AcquisitionKey, AcquisitionRow, AlarmKey, AlarmRow, ChangeRow, DishRow,
    EmbryoRow, ImsBody, ImsRecordRow, ImsStateRow, InstrumentRow, PatientRow, StateRow,
    TelemetryKey, TelemetryRow, TreatmentRow, WellKey,
};
use crate::volume::{self, Appender, Location, RecordHeader, Volumes};
use redb::{ReadableTable, Table, WriteTransaction};

mod clinical;
mod devices;
mod models;

type Rows<'txn, K> = Table<'txn, K, &'static [u8]>;

/// All tables of the schema, open in one write transaction, plus the counters row.
pub struct Batch<'txn> {
    meta: Table<'txn, &'static str, &'static [u8]>,
    instruments: Rows<'txn, u64>,
    instrument_by_serial: Table<'txn, &'static str, u64>,
    patients: Rows<'txn, u64>,
    patient_by_id: Table<'txn, &'static str, u64>,
    patient_by_idx: Table<'txn, &'static str, u64>,
    patient_differences: Rows<'txn, u64>,
    treatments: Rows<'txn, u64>,
    treatment_by_patient_name: Table<'txn, (u64, &'static str), u64>,
    dishes: Rows<'txn, u64>,
    dish_by_instrument: Table<'txn, (u64, &'static str), u64>,
    dish_by_treatment: Table<'txn, (u64, u64), ()>,
    wells: Rows<'txn, WellKey>,
    embryo_by_id: Table<'txn, &'static str, WellKey>,
    embryo_by_key: Table<'txn, u64, WellKey>,
    acquisitions: Rows<'txn, AcquisitionKey>,
    instrument_days: Rows<'txn, (u64, u32)>,
    volume_rows: Rows<'txn, u32>,
    volume_archive: Rows<'txn, u32>,
    models: Rows<'txn, (&'static str, u32)>,
    model_results: Rows<'txn, (u64, &'static str)>,
    activity_curves: Rows<'txn, u64>,
    devices: Rows<'txn, &'static str>,
    /// Where the batch's image records go, and the volumes to read stored ones from.
    appender: &'txn mut Appender,
    volumes: &'txn Volumes,
    telemetry: Rows<'txn, TelemetryKey>,
    changes: Rows<'txn, u64>,
    annotations: Rows<'txn, (u64, u64)>,
    audit: Rows<'txn, u64>,
    users: Rows<'txn, &'static str>,
    login_failures: Rows<'txn, (&'static str, &'static str)>,
    scores: Rows<'txn, (u64, &'static str)>,
    transfers: Rows<'txn, u64>,
    transfer_by_treatment: Table<'txn, (u64, u64), ()>,
    api_keys: Rows<'txn, &'static str>,
    idempotency: Rows<'txn, (&'static str, &'static str)>,
    idempotency_by_age: Table<'txn, (i64, &'static str, &'static str), ()>,
    ims_queue: Rows<'txn, u64>,
    ims_alarms: Rows<'txn, AlarmKey>,
    state: StateRow,
    ims_state: ImsStateRow,
    /// What new patients' `patient_idx` begin with (`meta/site_name`).
    site_name: String,
}

impl<'txn> Batch<'txn> {
    pub(crate) fn open(
        txn: &'txn WriteTransaction,
        appender: &'txn mut Appender,
        volumes: &'txn Volumes,
    ) -> Result<Batch<'txn>, StorageError> {
        let meta = txn.open_table(tables::META)?;
        let state = read_state(&meta)?;
        let ims_state = read_ims_state(&meta)?;
        let site_name = tables::site_name(
            &meta
                .get(tables::META_SITE_NAME)?
                .map(|bytes| String::from_utf8_lossy(bytes.value()).into_owned())
                .unwrap_or_default(),
        );
        Ok(Batch {
            meta,
            instruments: txn.open_table(tables::INSTRUMENTS)?,
            instrument_by_serial: txn.open_table(tables::INSTRUMENT_BY_SERIAL)?,
            patients: txn.open_table(tables::PATIENTS)?,
            patient_by_id: txn.open_table(tables::PATIENT_BY_ID)?,
            patient_by_idx: txn.open_table(tables::PATIENT_BY_IDX)?,
            patient_differences: txn.open_table(tables::PATIENT_DIFFERENCES)?,
            treatments: txn.open_table(tables::TREATMENTS)?,
            treatment_by_patient_name: txn.open_table(tables::TREATMENT_BY_PATIENT_NAME)?,
            dishes: txn.open_table(tables::DISHES)?,
            dish_by_instrument: txn.open_table(tables::DISH_BY_INSTRUMENT)?,
            dish_by_treatment: txn.open_table(tables::DISH_BY_TREATMENT)?,
            wells: txn.open_table(tables::WELLS)?,
            embryo_by_id: txn.open_table(tables::EMBRYO_BY_ID)?,
            embryo_by_key: txn.open_table(tables::EMBRYO_BY_KEY)?,
            acquisitions: txn.open_table(tables::ACQUISITIONS)?,
            instrument_days: txn.open_table(tables::INSTRUMENT_DAYS)?,
            volume_rows: txn.open_table(tables::VOLUMES)?,
            volume_archive: txn.open_table(tables::VOLUME_ARCHIVE)?,
            models: txn.open_table(tables::MODELS)?,
            model_results: txn.open_table(tables::MODEL_RESULTS)?,
            activity_curves: txn.open_table(tables::ACTIVITY_CURVES)?,
            devices: txn.open_table(tables::DEVICES)?,
            appender,
            volumes,
            telemetry: txn.open_table(tables::TELEMETRY)?,
            changes: txn.open_table(tables::CHANGES)?,
            annotations: txn.open_table(tables::ANNOTATIONS)?,
            audit: txn.open_table(tables::AUDIT)?,
            users: txn.open_table(tables::USERS)?,
            login_failures: txn.open_table(tables::LOGIN_FAILURES)?,
            scores: txn.open_table(tables::SCORES)?,
            transfers: txn.open_table(tables::TRANSFERS)?,
            transfer_by_treatment: txn.open_table(tables::TRANSFER_BY_TREATMENT)?,
            api_keys: txn.open_table(tables::API_KEYS)?,
            idempotency: txn.open_table(tables::IDEMPOTENCY)?,
            idempotency_by_age: txn.open_table(tables::IDEMPOTENCY_BY_AGE)?,
            ims_queue: txn.open_table(tables::IMS_QUEUE)?,
            ims_alarms: txn.open_table(tables::IMS_ALARMS)?,
            state,
            ims_state,
            site_name,
        })
    }

    /// The `volumes` table (for `crate::archive`).
    pub(crate) fn volume_rows(&mut self) -> &mut Rows<'txn, u32> {
        &mut self.volume_rows
    }

    /// The `activity_curves` table (for `crate::activity`).
    pub(crate) fn activity_curves(&mut self) -> &mut Rows<'txn, u64> {
        &mut self.activity_curves
    }

    /// The `devices` table (for `crate::devices`).
    pub(crate) fn devices(&mut self) -> &mut Rows<'txn, &'static str> {
        &mut self.devices
    }

    /// The `meta` table (for `crate::activity`).
    pub(crate) fn meta(&mut self) -> &mut Rows<'txn, &'static str> {
        &mut self.meta
    }

    /// The `embryo_by_id` table (for `crate::activity`).
    pub(crate) fn embryo_by_id(&self) -> &Table<'txn, &'static str, WellKey> {
        &self.embryo_by_id
    }

    /// The `wells` table (for `crate::activity`).
    pub(crate) fn wells(&self) -> &Rows<'txn, WellKey> {
        &self.wells
    }

    /// The `volume_archive` table (for `crate::archive`).
    pub(crate) fn volume_archive(&mut self) -> &mut Rows<'txn, u32> {
        &mut self.volume_archive
    }

    /// Makes the batch's image records durable (one write and one `fdatasync` per volume
    /// touched), records the volumes' new ends and writes the counters row. Call once, after the
    /// last op and just before commit; whatever fails after it, call `Appender::abort`.
    pub(crate) fn finish(mut self, at_ms: i64) -> Result<volume::VolumeChanges, StorageError> {
        self.state.check()?;
        let changes = self.appender.sync(at_ms)?;
        for (id, row) in &changes.rows {
            self.volume_rows.insert(*id, encode(row).as_slice())?;
        }
        self.meta
            .insert(tables::META_STATE, encode(&self.state).as_slice())?;
        self.meta
            .insert(tables::META_IMS, encode(&self.ims_state).as_slice())?;
        Ok(changes)
    }

    /// Validates `op`, then applies it (see `Operation::apply`).
    pub(crate) fn run<O: Operation>(&mut self, op: &O) -> Applied<O> {
        if let Err(message) = op.validate() {
            return Ok(Err(WriteError::InvalidInput(message)));
        }
        op.apply(self)
    }

    // ---------------------------------------------------------------- instruments

    pub(crate) fn instrument_hello(&mut self, hello: &InstrumentHello) -> Applied<InstrumentHello> {
        let InstrumentHello {
            serial,
            model,
            firmware,
            presented_secret,
            new_secret,
            issued_connection_open,
            enrolment,
            number,
            at_ms,
        } = hello;
        let (presented_secret, at_ms) = (presented_secret.as_deref(), *at_ms);
        let Some(instrument_id) = self
            .instrument_by_serial
            .get(serial.as_str())?
            .map(|g| g.value())
        else {
            if *enrolment == Enrolment::Approve {
                return Ok(Err(WriteError::Refused(HelloRefusal::EnrolmentPending)));
            }
            let new = NewInstrument {
                serial,
                model,
                firmware,
                number: *number,
            };
            return self.instrument_create(new, new_secret, presented_secret, at_ms);
        };
        let mut row: InstrumentRow = get_row(&self.instruments, instrument_id, "instrument")?;
        let presented = tables::sha256(presented_secret.unwrap_or("").as_bytes());
        let issued_secret =
            match check_secret(&mut row, &presented, new_secret, *issued_connection_open) {
                SecretCheck::Accepted { issued_secret } => issued_secret,
                SecretCheck::Refused(refusal) => return Ok(Err(WriteError::Refused(refusal))),
            };
        let renumbered = *number != 0
            && row.number != *number
            && row.number_source != tables::NUMBER_BY_ADMINISTRATOR;
        if *number != 0 && row.number_source == tables::NUMBER_BY_SERVER {
            row.number_source = tables::NUMBER_BY_INSTRUMENT;
        }
        if renumbered {
            self.warn_if_number_taken(serial, *number)?;
            row.number = *number;
        }
        let changed = &row.model != model || &row.firmware != firmware || renumbered;
        row.model = model.to_string();
        row.firmware = firmware.to_string();
        row.last_seen_ms = row.last_seen_ms.max(at_ms);
        self.instruments
            .insert(instrument_id, encode(&row).as_slice())?;
        if changed {
            let summary = format!(
                "instrument {serial} is now number {} ({model} firmware {firmware})",
                row.number
            );
            self.change(
                ChangeEntity::Instrument,
                instrument_id,
                serial,
                0,
                at_ms,
                summary,
            )?;
        }
        Ok(Ok(InstrumentAccepted {
            instrument_id,
            issued_secret,
        }))
    }

    fn instrument_create(
        &mut self,
        new: NewInstrument<'_>,
        new_secret: &str,
        presented_secret: Option<&str>,
        at_ms: i64,
    ) -> Applied<InstrumentHello> {
        let secrets = InstrumentSecrets {
            issued_secret_sha256: Some(tables::sha256(new_secret.as_bytes())),
            issued_for_sha256: Some(tables::sha256(presented_secret.unwrap_or("").as_bytes())),
        };
        let summary = format!("instrument {} ({}) first seen", new.serial, new.model);
        let instrument_id = match self.instrument_insert(new, secrets, at_ms, summary)? {
            Ok(instrument_id) => instrument_id,
            Err(message) => return Ok(Err(WriteError::InvalidInput(message))),
        };
        Ok(Ok(InstrumentAccepted {
            instrument_id,
            issued_secret: Some(new_secret.to_string()),
        }))
    }

    /// Records a new instrument (its serial number is not known) with the given secrets:
    /// none for one an administrator approved, so its first HELLO is issued one. Returns its
    /// id, or why it cannot be recorded.
    pub(crate) fn instrument_insert(
        &mut self,
        new: NewInstrument<'_>,
        secrets: InstrumentSecrets,
        at_ms: i64,
        summary: String,
    ) -> Result<Result<u64, String>, StorageError> {
        let NewInstrument {
            serial,
            model,
            firmware,
            number,
        } = new;
        let (number, number_source) = if number != 0 {
            self.warn_if_number_taken(serial, number)?;
            (number, tables::NUMBER_BY_INSTRUMENT)
        } else {
            (self.lowest_free_number()?, tables::NUMBER_BY_SERVER)
        };
        let instrument_id = self.state.instrument_id_last + 1;
        let row = InstrumentRow {
            serial: serial.to_string(),
            model: model.to_string(),
            firmware: firmware.to_string(),
            number,
            display_name: serial.to_string(),
            first_seen_ms: at_ms,
            last_seen_ms: at_ms,
            secret_sha256: None,
            issued_secret_sha256: secrets.issued_secret_sha256,
            issued_for_sha256: secrets.issued_for_sha256,
            number_source,
        };
        insert_new(
            &mut self.instruments,
            instrument_id,
            &encode(&row),
            "instrument",
        )?;
        self.instrument_by_serial.insert(serial, instrument_id)?;
        self.state.instrument_id_last = instrument_id;
        self.state.instruments += 1;
        self.change(
            ChangeEntity::Instrument,
            instrument_id,
            serial,
            0,
            at_ms,
            summary,
        )?;
        Ok(Ok(instrument_id))
    }

    /// The number a new instrument that sends none is given: the lowest that no instrument
    /// has (1, 2, ... in the order first seen, around the instruments' own numbers).
    fn lowest_free_number(&self) -> Result<u32, StorageError> {
        let mut used = std::collections::BTreeSet::new();
        for entry in self.instruments.iter()? {
            let (_, value) = entry?;
            let row: InstrumentRow = decode(value.value(), "instrument")?;
            used.insert(row.number);
        }
        Ok((1..=u32::MAX)
            .find(|n| !used.contains(n))
            .unwrap_or(u32::MAX))
    }

    /// The serial number of another instrument that has `number`, if one does.
    pub(crate) fn number_holder(
        &self,
        serial: &str,
        number: u32,
    ) -> Result<Option<String>, StorageError> {
        for entry in self.instruments.iter()? {
            let (_, value) = entry?;
            let row: InstrumentRow = decode(value.value(), "instrument")?;
            if row.number == number && row.serial != serial {
                return Ok(Some(row.serial));
            }
        }
        Ok(None)
    }

    /// An instrument's own number is its truth, even when another instrument has it (two
    /// instruments then report the same `InstrumentNumber`): the administrator is told.
    fn warn_if_number_taken(&self, serial: &str, number: u32) -> Result<(), StorageError> {
        if let Some(other) = self.number_holder(serial, number)? {
            tracing::warn!(
                serial,
                number,
                other = %other,
                "an instrument's own number is another instrument's too; set one with \
                 `esserver instrument number SERIAL N`"
            );
        }
        Ok(())
    }

    pub(crate) fn confirm_secret(
        &mut self,
        instrument_id: u64,
        secret_sha256: &[u8; 32],
    ) -> Applied<ConfirmInstrumentSecret> {
        let Some(bytes) = self.instruments.get(instrument_id)? else {
            return Ok(Ok(SecretConfirmed { confirmed: false }));
        };
        let mut row: InstrumentRow = decode(bytes.value(), "instrument")?;
        drop(bytes);
        let issued = row
            .issued_secret_sha256
            .is_some_and(|hash| equal_constant_time(secret_sha256, &hash));
        if !issued {
            return Ok(Ok(SecretConfirmed { confirmed: false }));
        }
        row.secret_sha256 = row.issued_secret_sha256.take();
        row.issued_for_sha256 = None;
        self.instruments
            .insert(instrument_id, encode(&row).as_slice())?;
        Ok(Ok(SecretConfirmed { confirmed: true }))
    }

    pub(crate) fn reset_secret(&mut self, serial: &str) -> Applied<ResetInstrumentSecret> {
        let Some(instrument_id) = self.instrument_by_serial.get(serial)?.map(|g| g.value()) else {
            return Ok(Ok(SecretReset { existed: false }));
        };
        let mut row: InstrumentRow = get_row(&self.instruments, instrument_id, "instrument")?;
        row.secret_sha256 = None;
        row.issued_secret_sha256 = None;
        row.issued_for_sha256 = None;
        self.instruments
            .insert(instrument_id, encode(&row).as_slice())?;
        Ok(Ok(SecretReset { existed: true }))
    }

    // ---------------------------------------------------------------- dishes

    pub(crate) fn register_dish(
        &mut self,
        instrument_id: u64,
        dish: &DishRegistration,
        at_ms: i64,
    ) -> Applied<RegisterDish> {
        // Check.
        if self.instruments.get(instrument_id)?.is_none() {
            return Ok(Err(WriteError::Refused(UnknownInstrument)));
        }
        let existing = self
            .dish_by_instrument
            .get((instrument_id, dish.dish_id.as_str()))?
            .map(|g| g.value());
        if let Some(dish_key) = existing {
            if let Err(error) = self.check_dish_owner(dish_key, dish)? {
                return Ok(Err(error));
            }
        }
        if let Err(error) = self.check_wells(existing, dish)? {
            return Ok(Err(error));
        }
        // Apply. Every write below records a change, so an unchanged change log means the
        // registration was already stored exactly as given.
        let changes_before = self.state.change_last_seq;
        let serial = self.instrument_serial(instrument_id)?;
        let patient_key = self.patient_upsert(&dish.patient, &serial, &dish.dish_id, at_ms)?;
        let treatment_key = self.treatment_upsert(patient_key, &dish.treatment_name, at_ms)?;
        let (dish_key, created) = match existing {
            Some(dish_key) => {
                self.dish_update(dish_key, dish, at_ms)?;
                (dish_key, false)
            }
            None => (
                self.dish_create(instrument_id, treatment_key, dish, at_ms)?,
                true,
            ),
        };
        self.wells_create(dish_key, dish, at_ms)?;
        let changed = self.state.change_last_seq != changes_before;
        Ok(Ok(DishRegistered {
            dish_key,
            created,
            changed,
        }))
    }

    /// A registered dish stays with its patient and treatment.
    fn check_dish_owner(
        &self,
        dish_key: u64,
        dish: &DishRegistration,
    ) -> Result<Result<(), WriteError<UnknownInstrument>>, StorageError> {
        let row: DishRow = get_row(&self.dishes, dish_key, "dish")?;
        let treatment: TreatmentRow = get_row(&self.treatments, row.treatment_key, "treatment")?;
        let patient: PatientRow = get_row(&self.patients, treatment.patient_key, "patient")?;
        if patient.patient_id != dish.patient.patient_id || treatment.name != dish.treatment_name {
            return Ok(Err(WriteError::InvalidInput(format!(
                "dish {} is registered to another patient or treatment; \
                 a dish cannot move between patients or treatments",
                dish.dish_id
            ))));
        }
        if row.insemination_at_ms != dish.insemination_at_ms {
            return Ok(Err(WriteError::InvalidInput(format!(
                "dish {} was registered with insemination time {} ms; it is t0 of every embryo \
                 of the dish and cannot change (given {} ms)",
                dish.dish_id, row.insemination_at_ms, dish.insemination_at_ms
            ))));
        }
        Ok(Ok(()))
    }

    /// An embryo id, once assigned to (dish, well), never changes, and names one well only.
    fn check_wells(
        &self,
        dish_key: Option<u64>,
        dish: &DishRegistration,
    ) -> Result<Result<(), WriteError<UnknownInstrument>>, StorageError> {
        for well in &dish.wells {
            if let Some(dish_key) = dish_key {
                if let Some(row) = self.wells.get((dish_key, well.well))? {
                    let embryo: EmbryoRow = decode(row.value(), "embryo")?;
                    if embryo.embryo_id != well.embryo_id {
                        return Ok(Err(WriteError::InvalidInput(format!(
                            "well {} of dish {} holds embryo {}; an embryo id never changes",
                            well.well, dish.dish_id, embryo.embryo_id
                        ))));
                    }
                    continue;
                }
            }
            if self.embryo_by_id.get(well.embryo_id.as_str())?.is_some() {
                return Ok(Err(WriteError::InvalidInput(format!(
                    "embryo id {} is already assigned to another well",
                    well.embryo_id
                ))));
            }
        }
        Ok(Ok(()))
    }

    /// The dish's patient: created when new. A known patient's details have one owner, the
    /// clinic (REST API, viewer): an empty stored field is filled in, but details that
    /// disagree with the stored ones are kept as stored and recorded in
    /// `patient_differences` (and the change log and audit trail) for an embryologist to
    /// resolve. The images matter more than the disagreement, so the dish is registered.
    fn patient_upsert(
        &mut self,
        patient: &PatientRef,
        serial: &str,
        dish_id: &str,
        at_ms: i64,
    ) -> Result<u64, StorageError> {
        let id = patient.patient_id.as_str();
        let Some(patient_key) = self.patient_by_id.get(id)?.map(|g| g.value()) else {
            let patient_key = self.state.patient_key_last + 1;
            let mut row = PatientRow::new(patient, at_ms);
            if self.patient_idx_taken(&row.patient_idx)? {
                // Another patient has it: this one is given its own.
                row.patient_idx.clear();
            }
            self.patient_insert(patient_key, row)?;
            let summary = format!("patient {id} created");
            self.change(ChangeEntity::Patient, patient_key, id, 1, at_ms, summary)?;
            return Ok(patient_key);
        };
        let mut row: PatientRow = get_row(&self.patients, patient_key, "patient")?;
        let before = row.clone();
        let mut differs = false;
        for (field, given) in [
            (&mut row.first_name, &patient.first_name),
            (&mut row.last_name, &patient.last_name),
            (&mut row.date_of_birth, &patient.date_of_birth),
        ] {
            if given.is_empty() || field == given {
                continue;
            }
            if field.is_empty() {
                field.clone_from(given);
            } else {
                differs = true;
            }
        }
        if row != before {
            row.updated_at_ms = at_ms;
            row.version += 1;
            self.patients.insert(patient_key, encode(&row).as_slice())?;
            let summary = format!("patient {id}: details filled in by an instrument");
            self.change(
                ChangeEntity::Patient,
                patient_key,
                id,
                row.version,
                at_ms,
                summary,
            )?;
        }
        if differs {
            self.patient_difference(patient_key, &row, patient, serial, dish_id, at_ms)?;
        }
        Ok(patient_key)
    }

    /// Records that a dish registration gave other details for a stored patient.
    fn patient_difference(
        &mut self,
        patient_key: u64,
        stored: &PatientRow,
        given: &PatientRef,
        serial: &str,
        dish_id: &str,
        at_ms: i64,
    ) -> Result<(), StorageError> {
        let times = match self.patient_differences.get(patient_key)? {
            Some(bytes) => {
                let old: tables::PatientDifferenceRow =
                    decode(bytes.value(), "patient difference")?;
                let same = old.first_name == given.first_name
                    && old.last_name == given.last_name
                    && old.date_of_birth == given.date_of_birth
                    && old.dish_id == dish_id
                    && old.instrument_serial == serial;
                if same {
                    // A resent registration: recorded already.
                    return Ok(());
                }
                old.times + 1
            }
            None => 1,
        };
        let row = tables::PatientDifferenceRow {
            instrument_serial: serial.to_string(),
            dish_id: dish_id.to_string(),
            first_name: given.first_name.clone(),
            last_name: given.last_name.clone(),
            date_of_birth: given.date_of_birth.clone(),
            at_ms,
            times,
        };
        self.patient_differences
            .insert(patient_key, encode(&row).as_slice())?;
        let id = stored.patient_id.as_str();
        self.change(
            ChangeEntity::Patient,
            patient_key,
            id,
            stored.version,
            at_ms,
            format!(
                "patient {id}: details from instrument {serial} (dish {dish_id}) differ; \
                 the stored ones were kept"
            ),
        )?;
        let details = |first: &str, last: &str, born: &str| {
            serde_json::json!({ "first_name": first, "last_name": last, "date_of_birth": born })
                .to_string()
        };
        self.audit_row(
            crate::apply::clinical::Audit {
                actor: &crate::ops::Actor {
                    user: format!("instrument:{serial}"),
                    computer: String::new(),
                },
                action: "patient.details_differ",
                entity: ChangeEntity::Patient,
                target: id,
                outcome: crate::model::AuditOutcome::Kept,
                before: details(&stored.first_name, &stored.last_name, &stored.date_of_birth),
                after: details(&given.first_name, &given.last_name, &given.date_of_birth),
            },
            at_ms,
        )
    }

    /// A patient the clinic edited has no difference left to resolve.
    pub(crate) fn patient_difference_resolved(
        &mut self,
        patient_key: u64,
    ) -> Result<(), StorageError> {
        self.patient_differences.remove(patient_key)?;
        Ok(())
    }

    /// Inserts a new patient; an empty `patient_idx` is minted from the site name and the
    /// creation time (1e-10 day later while the value is taken).
    pub(crate) fn patient_insert(
        &mut self,
        patient_key: u64,
        mut row: PatientRow,
    ) -> Result<(), StorageError> {
        if row.patient_idx.is_empty() {
            let mut step = 0u128;
            row.patient_idx = loop {
                let idx = tables::patient_idx(&self.site_name, row.created_at_ms, step);
                if self.patient_by_idx.get(idx.as_str())?.is_none() {
                    break idx;
                }
                step += 1;
            };
        }
        insert_new(&mut self.patients, patient_key, &encode(&row), "patient")?;
        self.patient_by_id
            .insert(row.patient_id.as_str(), patient_key)?;
        if self
            .patient_by_idx
            .insert(row.patient_idx.as_str(), patient_key)?
            .is_some()
        {
            return Err(StorageError::Corrupt(format!(
                "PatientIDx {} is already taken; callers check it first",
                row.patient_idx
            )));
        }
        self.state.patient_key_last = patient_key;
        self.state.patients += 1;
        Ok(())
    }

    /// Whether a `patient_idx` is taken.
    pub(crate) fn patient_idx_taken(&self, patient_idx: &str) -> Result<bool, StorageError> {
        Ok(self.patient_by_idx.get(patient_idx)?.is_some())
    }

    fn treatment_upsert(
        &mut self,
        patient_key: u64,
        name: &str,
        at_ms: i64,
    ) -> Result<u64, StorageError> {
        if let Some(key) = self
            .treatment_by_patient_name
            .get((patient_key, name))?
            .map(|g| g.value())
        {
            return Ok(key);
        }
        self.treatment_create(patient_key, name, "", at_ms)
    }

    fn treatment_create(
        &mut self,
        patient_key: u64,
        name: &str,
        comment: &str,
        at_ms: i64,
    ) -> Result<u64, StorageError> {
        let patient: PatientRow = get_row(&self.patients, patient_key, "patient")?;
        let treatment_key = self.state.treatment_key_last + 1;
        let row = TreatmentRow {
            patient_key,
            name: name.to_string(),
            created_at_ms: at_ms,
            updated_at_ms: at_ms,
            version: 1,
            comment: comment.to_string(),
        };
        insert_new(
            &mut self.treatments,
            treatment_key,
            &encode(&row),
            "treatment",
        )?;
        self.treatment_by_patient_name
            .insert((patient_key, name), treatment_key)?;
        self.state.treatment_key_last = treatment_key;
        self.state.treatments += 1;
        let summary = format!("treatment {name} created");
        let id = treatment_id(&patient.patient_id, name);
        self.change(
            ChangeEntity::Treatment,
            treatment_key,
            &id,
            1,
            at_ms,
            summary,
        )?;
        Ok(treatment_key)
    }

    fn dish_create(
        &mut self,
        instrument_id: u64,
        treatment_key: u64,
        dish: &DishRegistration,
        at_ms: i64,
    ) -> Result<u64, StorageError> {
        let dish_key = self.state.dish_key_last + 1;
        let row = DishRow {
            instrument_id,
            dish_id: dish.dish_id.clone(),
            slot: dish.slot,
            treatment_key,
            insemination_at_ms: dish.insemination_at_ms,
            created_at_ms: at_ms,
            updated_at_ms: at_ms,
            fertilization_method: dish.fertilization_method.clone(),
        };
        insert_new(&mut self.dishes, dish_key, &encode(&row), "dish")?;
        self.dish_by_instrument
            .insert((instrument_id, dish.dish_id.as_str()), dish_key)?;
        self.dish_by_treatment
            .insert((treatment_key, dish_key), ())?;
        self.state.dish_key_last = dish_key;
        self.state.dishes += 1;
        let summary = format!(
            "dish {} registered on instrument {instrument_id} slot {}",
            dish.dish_id, dish.slot
        );
        self.change(
            ChangeEntity::Dish,
            dish_key,
            &dish.dish_id,
            0,
            at_ms,
            summary,
        )?;
        Ok(dish_key)
    }

    fn dish_update(
        &mut self,
        dish_key: u64,
        dish: &DishRegistration,
        at_ms: i64,
    ) -> Result<(), StorageError> {
        let mut row: DishRow = get_row(&self.dishes, dish_key, "dish")?;
        // The insemination time never changes (check_dish_owner); the slot may (a dish
        // moved), and a fertilization method given later is recorded.
        let method_given = !dish.fertilization_method.is_empty()
            && row.fertilization_method != dish.fertilization_method;
        if row.slot == dish.slot && !method_given {
            return Ok(());
        }
        row.slot = dish.slot;
        if method_given {
            row.fertilization_method
                .clone_from(&dish.fertilization_method);
        }
        row.updated_at_ms = at_ms;
        self.dishes.insert(dish_key, encode(&row).as_slice())?;
        let summary = format!(
            "dish {} updated: slot {}, fertilization {}",
            dish.dish_id, dish.slot, row.fertilization_method
        );
        self.change(
            ChangeEntity::Dish,
            dish_key,
            &dish.dish_id,
            0,
            at_ms,
            summary,
        )
    }

    /// The dish's place among its treatment's dishes, from 0 (dish keys ascend with
    /// registration).
    fn dish_index_in_treatment(&self, dish_key: u64) -> Result<u64, StorageError> {
        let row: DishRow = get_row(&self.dishes, dish_key, "dish")?;
        let before = self
            .dish_by_treatment
            .range((row.treatment_key, 0)..(row.treatment_key, dish_key))?
            .count();
        Ok(before as u64)
    }

    fn instrument_serial(&self, instrument_id: u64) -> Result<String, StorageError> {
        let row: InstrumentRow = get_row(&self.instruments, instrument_id, "instrument")?;
        Ok(row.serial)
    }

    /// Creates the embryos of wells not registered yet (checked by `check_wells`).
    fn wells_create(
        &mut self,
        dish_key: u64,
        dish: &DishRegistration,
        at_ms: i64,
    ) -> Result<(), StorageError> {
        let mut dish_index = None;
        for well in &dish.wells {
            let key = (dish_key, well.well);
            if self.wells.get(key)?.is_some() {
                continue;
            }
            let label = if well.label.is_empty() {
                let index = match dish_index {
                    Some(index) => index,
                    None => {
                        let index = self.dish_index_in_treatment(dish_key)?;
                        dish_index = Some(index);
                        index
                    }
                };
                tables::embryo_label(index, well.well)
            } else {
                well.label.clone()
            };
            let embryo_key = self.state.embryo_key_last + 1;
            let row = EmbryoRow {
                embryo_key,
                embryo_id: well.embryo_id.clone(),
                created_at_ms: at_ms,
                updated_at_ms: at_ms,
                version: 1,
                fate: crate::model::Fate::Undecided.to_u8(),
                comment: String::new(),
                label,
            };
            self.wells.insert(key, encode(&row).as_slice())?;
            let previous = self.embryo_by_id.insert(well.embryo_id.as_str(), key)?;
            assert!(previous.is_none(), "check_wells refuses reused embryo ids");
            drop(previous);
            if self.embryo_by_key.insert(embryo_key, key)?.is_some() {
                return Err(StorageError::Corrupt(format!(
                    "embryo key {embryo_key} is already taken: the id counter is behind the table"
                )));
            }
            self.state.embryo_key_last = embryo_key;
            self.state.embryos += 1;
            let summary = format!(
                "embryo {} in dish {} well {}",
                well.embryo_id, dish.dish_id, well.well
            );
            self.change(
                ChangeEntity::Embryo,
                embryo_key,
                &well.embryo_id,
                1,
                at_ms,
                summary,
            )?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- images

    pub(crate) fn put_image(&mut self, image: &PutImage) -> Applied<PutImage> {
        let (jpeg, at_ms) = (&image.jpeg, image.at_ms);
        // Check.
        if self.instruments.get(image.instrument_id)?.is_none() {
            return Ok(Err(WriteError::Refused(ImageRefusal::UnknownInstrument)));
        }
        let Some(dish_key) = self
            .dish_by_instrument
            .get((image.instrument_id, image.dish_id.as_str()))?
            .map(|g| g.value())
        else {
            return Ok(Err(WriteError::Refused(ImageRefusal::UnknownDish)));
        };
        let Some(embryo_row) = self.wells.get((dish_key, image.well))? else {
            return Ok(Err(WriteError::Refused(ImageRefusal::UnknownWell)));
        };
        let embryo: EmbryoRow = decode(embryo_row.value(), "embryo")?;
        drop(embryo_row);
        let sha256 = *jpeg.sha256();
        let key = (
            dish_key,
            image.well,
            image.acquired_at_ms,
            image.focal_plane,
        );
        let acquisition_key = (dish_key, image.well, image.acquired_at_ms);
        let acquisition = match self.acquisitions.get(acquisition_key)? {
            Some(guard) => Some(AcquisitionRow::decode(guard.value())?),
            None => None,
        };
        let stored = acquisition
            .as_ref()
            .and_then(|row| row.location(image.focal_plane));
        let mut repaired_bytes: Option<u64> = None;
        if let Some(location) = stored {
            match self.stored_image(location, key)? {
                Stored::Intact {
                    sha256: stored_sha,
                    jpeg_len,
                } => {
                    return Ok(if stored_sha == sha256 && jpeg_len == jpeg.len() as u64 {
                        Ok(ImageStored { duplicate: true })
                    } else {
                        Err(WriteError::Refused(ImageRefusal::Conflict))
                    });
                }
                Stored::Archived => {
                    // Refused rather than stored over an original that may differ.
                    tracing::warn!(
                        dish_key,
                        well = image.well,
                        focal_plane = image.focal_plane,
                        acquired_at_ms = image.acquired_at_ms,
                        "a resent image is archived and cannot be compared locally (its volume's companion file is missing): refused"
                    );
                    return Ok(Err(WriteError::Refused(ImageRefusal::Conflict)));
                }
                Stored::Damaged {
                    sha256: Some(stored_sha),
                } if stored_sha != sha256 => {
                    // Damaged, and not a copy of these bytes: keep it for an administrator
                    // rather than guess.
                    return Ok(Err(WriteError::Refused(ImageRefusal::Conflict)));
                }
                Stored::Damaged { .. } => {
                    // The stored copy is damaged and this is its original (or its header is
                    // gone): store it again, so the instrument does not drop its only good
                    // copy believing it delivered. The damaged record stays, superseded.
                    tracing::warn!(
                        dish_key,
                        well = image.well,
                        focal_plane = image.focal_plane,
                        acquired_at_ms = image.acquired_at_ms,
                        "repairing a damaged stored image from a resend of its original"
                    );
                    let header_len = (volume::HEADER_FIXED_BYTES + image.dish_id.len()) as u64;
                    repaired_bytes = Some(u64::from(location.length).saturating_sub(header_len));
                }
            }
        }
        // Apply.
        let header = RecordHeader {
            dish_key,
            instrument_id: image.instrument_id,
            dish_id: image.dish_id.to_string(),
            well: image.well,
            acquired_at_ms: image.acquired_at_ms,
            focal_plane: image.focal_plane,
            stored_at_ms: at_ms,
            sha256,
            jpeg_len: u32::try_from(jpeg.len()).expect("validated against JPEG_BYTES_MAX"),
        };
        let location = self.appender.append(&header, jpeg, at_ms)?;
        let created = acquisition.is_none();
        let mut row = acquisition.unwrap_or(AcquisitionRow {
            planes: Vec::new(),
            first_stored_at_ms: at_ms,
        });
        row.set(image.focal_plane, location);
        self.acquisitions
            .insert(acquisition_key, row.encode().as_slice())?;
        if let Some(old_bytes) = repaired_bytes {
            self.state.image_bytes =
                self.state.image_bytes.saturating_sub(old_bytes) + jpeg.len() as u64;
            return Ok(Ok(ImageStored { duplicate: false }));
        }
        self.state.images += 1;
        self.state.image_bytes += jpeg.len() as u64;
        self.count_instrument_day(image.instrument_id, jpeg.len() as u64, at_ms)?;
        if created {
            self.state.acquisitions += 1;
            // No summary text: one of these is logged per acquisition, about 90 bytes each
            // that the reader words from the entity and id instead (`change_from_row`).
            self.change(
                ChangeEntity::Acquisition,
                embryo.embryo_key,
                &embryo.embryo_id,
                0,
                at_ms,
                String::new(),
            )?;
        }
        Ok(Ok(ImageStored { duplicate: false }))
    }

    /// Counts one new image of `instrument_id` stored at `at_ms` in its day's row.
    fn count_instrument_day(
        &mut self,
        instrument_id: u64,
        jpeg_bytes: u64,
        at_ms: i64,
    ) -> Result<(), StorageError> {
        let key = (instrument_id, tables::day_of(at_ms));
        let mut day: tables::InstrumentDayRow = match self.instrument_days.get(key)? {
            Some(bytes) => decode(bytes.value(), "instrument day")?,
            None => tables::InstrumentDayRow::default(),
        };
        day.images += 1;
        day.image_bytes += jpeg_bytes;
        day.last_image_ms = day.last_image_ms.max(at_ms);
        self.instrument_days.insert(key, encode(&day).as_slice())?;
        Ok(())
    }

    /// What is stored at `location` for `key`: read back from the batch's pending records or
    /// from its volume, and checked. Only a failing disk is an error.
    fn stored_image(
        &self,
        location: Location,
        key: tables::ImageKey,
    ) -> Result<Stored, StorageError> {
        if let Some(header) = self.appender.pending_header(location) {
            // Appended earlier in this batch: written by us a moment ago, intact.
            return Ok(Stored::Intact {
                sha256: header.sha256,
                jpeg_len: u64::from(header.jpeg_len),
            });
        }
        if location.is_legacy() {
            // The migration moves every legacy image before the writer starts.
            return Ok(Stored::Damaged { sha256: None });
        }
        match self.volumes.read_record(location, key) {
            Ok(record) => Ok(Stored::Intact {
                sha256: record.header.sha256,
                jpeg_len: u64::from(record.header.jpeg_len),
            }),
            Err(volume::ReadFailure::Io(error)) => Err(StorageError::Io(error)),
            Err(volume::ReadFailure::Missing(_))
                if self.volume_archive.get(location.volume)?.is_some() =>
            {
                // Archived, its local file gone: the companion file still lists the record's
                // header (the writer never reads the object store).
                let header = volume::read_companion(self.volumes, location.volume)
                    .ok()
                    .and_then(|(_, records)| {
                        records
                            .into_iter()
                            .find(|(offset, _)| *offset == location.offset)
                    })
                    .map(|(_, header)| header)
                    .filter(|header| header.image_key() == key);
                Ok(match header {
                    Some(header) => Stored::Intact {
                        sha256: header.sha256,
                        jpeg_len: u64::from(header.jpeg_len),
                    },
                    None => Stored::Archived,
                })
            }
            Err(volume::ReadFailure::Damaged(_) | volume::ReadFailure::Missing(_)) => {
                // The header may still be readable: it says whose bytes these were.
                let header = self
                    .volumes
                    .read_at(location.volume, location.offset, location.length as usize)
                    .ok()
                    .and_then(|bytes| RecordHeader::decode(&bytes).ok().flatten())
                    .filter(|header| header.image_key() == key);
                Ok(Stored::Damaged {
                    sha256: header.map(|h| h.sha256),
                })
            }
        }
    }

    // ---------------------------------------------------------------- telemetry

    pub(crate) fn put_telemetry(
        &mut self,
        instrument_id: u64,
        samples: &[TelemetrySample],
        alarms: &[AlarmInput],
        ims: Option<ImsQueueing>,
        at_ms: i64,
    ) -> Applied<PutTelemetry> {
        let instrument: InstrumentRow = match self.instruments.get(instrument_id)? {
            Some(bytes) => decode(bytes.value(), "instrument")?,
            None => return Ok(Err(WriteError::Refused(UnknownInstrument))),
        };
        let mut queued = Vec::new();
        let mut withheld = 0u32;
        let mut changed = 0u32;
        for sample in samples {
            // Idempotent by (instrument, channel, time): a resend after a lost ACK stores
            // nothing new (the first value received is kept) and queues nothing.
            let key = (instrument_id, sample.channel.as_str(), sample.at_ms);
            if self.telemetry.get(key)?.is_some() {
                continue;
            }
            let row = TelemetryRow {
                value: sample.value,
                stored_at_ms: at_ms,
            };
            self.telemetry.insert(key, encode(&row).as_slice())?;
            self.state.telemetry_samples += 1;
            changed += 1;
            let Some(ims) = ims else {
                continue;
            };
            if ims.channels.contains(&sample.channel.as_str()) {
                queued.push(ImsBody::Sample {
                    channel: sample.channel.clone(),
                    value: sample.value,
                    at_ms: sample.at_ms,
                });
            } else {
                withheld += 1;
            }
        }
        for alarm in alarms {
            // A resend stores nothing; a clear (or a changed severity) updates the row and is
            // queued again.
            let key = (instrument_id, alarm.code.as_str(), alarm.raised_at_ms);
            let existing: Option<AlarmRow> = match self.ims_alarms.get(key)? {
                Some(bytes) => Some(decode(bytes.value(), "alarm")?),
                None => None,
            };
            let unchanged = existing.as_ref().is_some_and(|row| {
                row.severity == alarm.severity && row.cleared_at_ms == alarm.cleared_at_ms
            });
            if unchanged {
                continue;
            }
            if existing.is_none() {
                self.ims_state.alarms += 1;
            }
            let row = AlarmRow {
                severity: alarm.severity,
                cleared_at_ms: alarm.cleared_at_ms,
                text: alarm.text.clone(),
                stored_at_ms: at_ms,
            };
            self.ims_alarms.insert(key, encode(&row).as_slice())?;
            changed += 1;
            let Some(ims) = ims else {
                continue;
            };
            if ims.alarm_codes.contains(&alarm.code.as_str()) {
                queued.push(ImsBody::Alarm {
                    code: alarm.code.clone(),
                    severity: alarm.severity,
                    raised_at_ms: alarm.raised_at_ms,
                    cleared_at_ms: alarm.cleared_at_ms,
                });
            } else {
                withheld += 1;
            }
        }
        let mut dropped = 0u32;
        let queued_count = u32::try_from(queued.len()).unwrap_or(u32::MAX);
        if let Some(ims) = ims {
            for body in queued {
                dropped += self.ims_push(&instrument, body, at_ms, ims.queue_bytes_max)?;
            }
        }
        self.ims_state.withheld += u64::from(withheld);
        let samples_empty = samples.is_empty();
        let samples = u32::try_from(samples.len()).expect("validate bounds the sample count");
        Ok(Ok(TelemetryStored {
            samples,
            duplicate: changed == 0 && (!samples_empty || !alarms.is_empty()),
            ims_queued: queued_count,
            ims_withheld: withheld,
            ims_dropped: dropped,
        }))
    }

    /// Queues one record (built here from the instrument's serial and model and `body`
    /// only) and drops the oldest records while the queue is over `bytes_max`. Returns how
    /// many were dropped.
    fn ims_push(
        &mut self,
        instrument: &InstrumentRow,
        body: ImsBody,
        at_ms: i64,
        bytes_max: u64,
    ) -> Result<u32, StorageError> {
        let row = ImsRecordRow {
            serial: instrument.serial.clone(),
            model: instrument.model.clone(),
            received_at_ms: at_ms,
            body,
        };
        let bytes = encode(&row);
        self.ims_state.id_last += 1;
        self.ims_queue
            .insert(self.ims_state.id_last, bytes.as_slice())?;
        self.ims_state.records += 1;
        self.ims_state.bytes += ims_row_bytes(bytes.len());
        let mut dropped = 0u32;
        while self.ims_state.bytes > bytes_max {
            let Some((_, value)) = self.ims_queue.pop_first()? else {
                break;
            };
            let size = ims_row_bytes(value.value().len());
            self.ims_state.records = self.ims_state.records.saturating_sub(1);
            self.ims_state.bytes = self.ims_state.bytes.saturating_sub(size);
            self.ims_state.dropped_records += 1;
            self.ims_state.dropped_bytes += size;
            dropped += 1;
        }
        Ok(dropped)
    }

    pub(crate) fn ims_remove(&mut self, ids: &[u64]) -> Applied<ImsRemove> {
        let mut removed = 0u32;
        for id in ids {
            if let Some(value) = self.ims_queue.remove(*id)? {
                let size = ims_row_bytes(value.value().len());
                self.ims_state.records = self.ims_state.records.saturating_sub(1);
                self.ims_state.bytes = self.ims_state.bytes.saturating_sub(size);
                self.ims_state.uploaded_records += 1;
                removed += 1;
            }
        }
        Ok(Ok(ImsRemoved { removed }))
    }

    // ---------------------------------------------------------------- change log

    fn change(
        &mut self,
        entity: ChangeEntity,
        key: u64,
        id: &str,
        version: u64,
        at_ms: i64,
        summary: String,
    ) -> Result<(), StorageError> {
        let seq = self.state.change_last_seq + 1;
        let row = ChangeRow {
            at_ms,
            entity: entity.to_u8(),
            key,
            id: id.to_string(),
            version,
            summary,
        };
        let previous = self.changes.insert(seq, encode(&row).as_slice())?;
        if previous.is_some() {
            return Err(StorageError::Corrupt(format!(
                "change seq {seq} already exists"
            )));
        }
        drop(previous);
        self.state.change_last_seq = seq;
        Ok(())
    }

    /// Removes changes older than `cutoff_ms` from the front of the log, at most
    /// `prune_max`, stopping at the first younger one so the retained log stays gapless.
    /// Returns the number removed.
    pub(crate) fn prune_changes(
        &mut self,
        cutoff_ms: i64,
        prune_max: u64,
    ) -> Result<u64, StorageError> {
        let mut pruned: u64 = 0;
        while pruned < prune_max {
            let Some((key, value)) = self.changes.first()? else {
                break;
            };
            let seq = key.value();
            let at_ms = match decode::<ChangeRow>(value.value(), "change") {
                Ok(row) => row.at_ms,
                Err(error) => {
                    // Never fail every batch over one bad record: stop pruning there;
                    // `esserver verify` reports it.
                    tracing::error!(seq, %error, "a change record cannot be decoded; pruning stops at it");
                    break;
                }
            };
            drop((key, value));
            if at_ms >= cutoff_ms {
                break;
            }
            self.changes.remove(seq)?;
            pruned += 1;
        }
        if pruned > 0 {
            self.state.change_oldest_seq = match self.changes.first()? {
                Some((key, _)) => key.value(),
                None => self.state.change_last_seq + 1,
            };
        }
        Ok(pruned)
    }

    /// Removes idempotency records older than `cutoff_ms`, at most `prune_max`.
    pub(crate) fn prune_idempotency(
        &mut self,
        cutoff_ms: i64,
        prune_max: u64,
    ) -> Result<u64, StorageError> {
        let mut pruned: u64 = 0;
        while pruned < prune_max {
            let Some((key, _)) = self.idempotency_by_age.first()? else {
                break;
            };
            let (at_ms, principal, idempotency_key) = key.value();
            if at_ms >= cutoff_ms {
                break;
            }
            let (principal, idempotency_key) = (principal.to_string(), idempotency_key.to_string());
            drop(key);
            self.idempotency_by_age.remove((
                at_ms,
                principal.as_str(),
                idempotency_key.as_str(),
            ))?;
            self.idempotency
                .remove((principal.as_str(), idempotency_key.as_str()))?;
            pruned += 1;
        }
        Ok(pruned)
    }
}

/// Inserts a row under a freshly allocated key. A row already there means the id counter in
/// `state` is behind the table: refuse (the transaction is abandoned) rather than overwrite
/// a patient's record.
fn insert_new(
    table: &mut Rows<'_, u64>,
    key: u64,
    value: &[u8],
    what: &str,
) -> Result<(), StorageError> {
    if table.insert(key, value)?.is_some() {
        return Err(StorageError::Corrupt(format!(
            "{what} key {key} is already taken: the id counter is behind the table"
        )));
    }
    Ok(())
}

/// The natural id of a treatment: `patient id/treatment name`.
pub(crate) fn treatment_id(patient_id: &str, name: &str) -> String {
    format!("{patient_id}/{name}")
}

/// A stored image as a resend of it finds it.
enum Stored {
    Intact {
        sha256: [u8; 32],
        jpeg_len: u64,
    },
    /// The record does not check; its header's SHA-256 when that still reads.
    Damaged {
        sha256: Option<[u8; 32]>,
    },
    /// In the object store, and its header is not known locally (no companion file): it
    /// cannot be compared without the network, which the writer never uses.
    Archived,
}

/// The bytes a queue row counts for: its encoded value plus its 8-byte key.
fn ims_row_bytes(value_len: usize) -> u64 {
    value_len as u64 + 8
}

pub(crate) fn read_ims_state(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<ImsStateRow, StorageError> {
    let Some(bytes) = meta.get(tables::META_IMS)? else {
        return Err(StorageError::Corrupt(
            "meta ims_state row is missing".into(),
        ));
    };
    decode(bytes.value(), "meta ims_state")
}

pub(crate) fn read_state(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<StateRow, StorageError> {
    let Some(bytes) = meta.get(tables::META_STATE)? else {
        return Err(StorageError::Corrupt("meta state row is missing".into()));
    };
    let state: StateRow = decode(bytes.value(), "meta state")?;
    state.check()?;
    Ok(state)
}

/// Reads and decodes a row that an index points to; a dangling index is corruption.
pub(crate) fn get_row<T: serde::de::DeserializeOwned>(
    table: &impl ReadableTable<u64, &'static [u8]>,
    key: u64,
    what: &str,
) -> Result<T, StorageError> {
    match table.get(key)? {
        Some(bytes) => decode(bytes.value(), what),
        None => Err(StorageError::Corrupt(format!(
            "{what} {key} is referenced but missing"
        ))),
    }
}

fn equal_constant_time(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The instrument secret rules of the protocol (docs/protocol/incubator.md, section 6.2):
/// `None` refuses the HELLO; `Some(issued)` accepts it, with a newly issued secret or none.
/// Updates `row` for an accepted HELLO.
/// What a HELLO's secret allows.
enum SecretCheck {
    /// With the secret issued now, if one is.
    Accepted {
        issued_secret: Option<String>,
    },
    Refused(HelloRefusal),
}

/// An instrument to record: its serial number, model, firmware and its own number (0: the
/// server counts one).
pub(crate) struct NewInstrument<'a> {
    pub(crate) serial: &'a str,
    pub(crate) model: &'a str,
    pub(crate) firmware: &'a str,
    pub(crate) number: u32,
}

/// The secrets a new instrument row starts with.
#[derive(Default)]
pub(crate) struct InstrumentSecrets {
    pub(crate) issued_secret_sha256: Option<[u8; 32]>,
    pub(crate) issued_for_sha256: Option<[u8; 32]>,
}

/// Checks the presented secret (its SHA-256) against the row; on acceptance updates the row's
/// secrets (a refusal leaves the row as it was).
fn check_secret(
    row: &mut InstrumentRow,
    presented: &[u8; 32],
    new_secret: &str,
    issued_connection_open: bool,
) -> SecretCheck {
    let matches =
        |hash: Option<[u8; 32]>| hash.is_some_and(|hash| equal_constant_time(presented, &hash));
    if matches(row.issued_secret_sha256) {
        // The instrument stored what it was issued: that secret is now the one.
        row.secret_sha256 = row.issued_secret_sha256.take();
        row.issued_for_sha256 = None;
        return SecretCheck::Accepted {
            issued_secret: None,
        };
    }
    let reissue = row.issued_secret_sha256.is_some() && matches(row.issued_for_sha256);
    let first = row.secret_sha256.is_none() && row.issued_secret_sha256.is_none();
    if reissue && issued_connection_open {
        // The connection holding the issued secret is open: this is not the instrument whose
        // HELLO_OK was lost (that connection would be gone), or it reconnected too early.
        return SecretCheck::Refused(HelloRefusal::EnrolmentInProgress);
    }
    if reissue || first {
        // A HELLO_OK may have been lost: issue afresh, still accepting what led to it.
        row.issued_secret_sha256 = Some(tables::sha256(new_secret.as_bytes()));
        if first {
            row.issued_for_sha256 = Some(*presented);
        }
        return SecretCheck::Accepted {
            issued_secret: Some(new_secret.to_string()),
        };
    }
    if matches(row.secret_sha256) {
        return SecretCheck::Accepted {
            issued_secret: None,
        };
    }
    SecretCheck::Refused(HelloRefusal::AuthFailed)
}
