//! The browser viewer's devices: each browser that logs in to the browser viewer registers
//! once (a device id the server mints, bound to its cookie, and a name its user gives), and
//! counts against the licence's mobile devices until an administrator revokes it.
//!
//! # Rules
//!
//! - [`DeviceRegister`] records a new device only while fewer than its `limit` devices are
//!   registered and not revoked (`None`: no limit, a DEMO licence); beyond it the refusal says
//!   how many there are. Registering a known device again records the login (who, when); it
//!   is refused only while more devices are registered than the limit allows (registered
//!   under a DEMO licence, or before a licence with fewer), until an administrator revokes
//!   enough of them. A revoked device is refused: it must not come back by
//!   logging in again (the browser gets a new id and registers as a new device, if the
//!   licence leaves room).
//! - [`DeviceRevoke`] marks a device revoked (kept, for the record); revoking it again changes
//!   nothing. Both are audited (`device.register`, `device.revoke`), refusals too.

use crate::error::{Refusal, StorageError};
use crate::ops::{Actor, Applied, Operation};
use crate::reader::Reader;
use crate::tables::{self, decode, DeviceRow};
use std::fmt;

/// Longest device name, in bytes.
pub const DEVICE_NAME_BYTES_MAX: usize = 64;
/// A device id: 32 lowercase hex digits, minted by the server.
pub const DEVICE_ID_HEX_DIGITS: usize = 32;

/// True for a well-formed device id.
pub fn is_device_id(id: &str) -> bool {
    id.len() == DEVICE_ID_HEX_DIGITS
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Registers `device_id` as `name` for `actor.user`, or records a login from it.
#[derive(Debug, Clone)]
pub struct DeviceRegister {
    pub actor: Actor,
    pub device_id: String,
    pub name: String,
    /// Devices the licence allows; None: no limit.
    pub limit: Option<u32>,
    pub at_ms: i64,
}

/// What [`DeviceRegister`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRegistered {
    /// A new device (else a login from a known one).
    pub created: bool,
    /// Devices registered and not revoked, this one included.
    pub active: u32,
}

/// Revokes `device_id`.
#[derive(Debug, Clone)]
pub struct DeviceRevoke {
    pub actor: Actor,
    pub device_id: String,
    pub at_ms: i64,
}

/// Why a device operation was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceRefusal {
    /// The licence's devices are all taken.
    LimitReached {
        limit: u32,
        active: u32,
    },
    /// An administrator revoked this device.
    Revoked {
        by: String,
        at_ms: i64,
    },
    NotFound(String),
}

impl fmt::Display for DeviceRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceRefusal::LimitReached { limit, active } => write!(
                f,
                "the licence allows {limit} browser device(s) and {active} are registered; an \
                 administrator can revoke one that is no longer used"
            ),
            DeviceRefusal::Revoked { by, .. } => {
                write!(f, "this device was revoked by {by}; ask an administrator")
            }
            DeviceRefusal::NotFound(id) => write!(f, "no device {id}"),
        }
    }
}

impl Refusal for DeviceRefusal {
    fn code(&self) -> &'static str {
        match self {
            DeviceRefusal::LimitReached { .. } => "device_limit",
            DeviceRefusal::Revoked { .. } => "device_revoked",
            DeviceRefusal::NotFound(_) => "not_found",
        }
    }
}

fn check_id(id: &str) -> Result<(), String> {
    if is_device_id(id) {
        Ok(())
    } else {
        Err(format!(
            "a device id is {DEVICE_ID_HEX_DIGITS} lowercase hex digits"
        ))
    }
}

impl Operation for DeviceRegister {
    type Outcome = DeviceRegistered;
    type Refusal = DeviceRefusal;

    fn validate(&self) -> Result<(), String> {
        check_id(&self.device_id)?;
        let name = self.name.trim();
        if name.is_empty()
            || self.name.len() > DEVICE_NAME_BYTES_MAX
            || self.name.chars().any(char::is_control)
        {
            return Err(format!(
                "a device name has 1 to {DEVICE_NAME_BYTES_MAX} bytes, no control characters"
            ));
        }
        Ok(())
    }

    fn apply(&self, batch: &mut crate::apply::Batch<'_>) -> Applied<Self> {
        batch.device_register(self)
    }

    fn at_ms(&self) -> Option<i64> {
        Some(self.at_ms)
    }
}

impl Operation for DeviceRevoke {
    type Outcome = ();
    type Refusal = DeviceRefusal;

    fn validate(&self) -> Result<(), String> {
        check_id(&self.device_id)
    }

    fn apply(&self, batch: &mut crate::apply::Batch<'_>) -> Applied<Self> {
        batch.device_revoke(self)
    }

    fn at_ms(&self) -> Option<i64> {
        Some(self.at_ms)
    }
}

/// A device as the admin pages show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub device_id: String,
    pub row: DeviceRow,
}

impl Reader {
    /// Every device, revoked ones included, by id.
    pub fn devices(&self) -> Result<Vec<DeviceRecord>, StorageError> {
        let table = self.txn.open_table(tables::DEVICES)?;
        let mut out = Vec::new();
        for entry in table.range::<&str>(..)? {
            let (key, value) = entry?;
            out.push(DeviceRecord {
                device_id: key.value().to_string(),
                row: decode(value.value(), "device")?,
            });
        }
        Ok(out)
    }

    /// One device; None when it was never registered.
    pub fn device(&self, device_id: &str) -> Result<Option<DeviceRow>, StorageError> {
        let table = self.txn.open_table(tables::DEVICES)?;
        let row = match table.get(device_id)? {
            Some(row) => row,
            None => return Ok(None),
        };
        Ok(Some(decode(row.value(), "device")?))
    }
}

/// `esserver verify`: every device row decodes and is keyed by a well-formed id.
pub(crate) fn check_devices(
    txn: &redb::ReadTransaction,
    problem: &mut dyn FnMut(String),
) -> Result<(), StorageError> {
    let table = txn.open_table(tables::DEVICES)?;
    for entry in table.range::<&str>(..)? {
        let (key, value) = entry?;
        let id = key.value();
        if !is_device_id(id) {
            problem(format!("a device is keyed {id:?}, not a device id"));
        }
        if let Err(error) = decode::<DeviceRow>(value.value(), "device") {
            problem(format!("device {id}: {error}"));
        }
    }
    Ok(())
}
