//! What is stored, grouped into the units eviction removes whole, and which units to evict.
//! Built from the store's own listing (the sidecars stay the truth), so it is rebuilt after a
//! restart and agrees between replicas sharing a bucket. No I/O here.
//!
//! Units: one platform of a provider version (its download answer, zip and `.h1`; SHA256SUMS and
//! its signature go with the last platform of their version), and one module version (its
//! location, git resolution and archives). Version lists belong to no unit and stay.

use crate::storage::StorageKey;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

/// One stored object as the store lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    pub key: StorageKey,
    pub size: u64,
    /// Seconds since the Unix epoch when it was stored.
    pub stored_at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Provider,
    Module,
}

/// A unit of eviction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unit {
    pub kind: Kind,
    pub host: String,
    /// `namespace/type` or `namespace/name/system`.
    pub name: String,
    pub version: String,
    /// `os_arch` for providers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    pub size: u64,
    pub stored_at: u64,
    /// The last read of its artifact, when one was recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_access: Option<u64>,
    pub pinned: bool,
    /// Its objects; SHA256SUMS and its signature are not among them (see [`Plan`]).
    #[serde(skip)]
    pub keys: Vec<StorageKey>,
    /// The version folder, shared by a provider version's platforms.
    #[serde(skip)]
    pub dir: String,
}

impl Unit {
    /// When it was last of use: its last read, or when it was stored.
    pub fn last_used(&self) -> u64 {
        self.last_access
            .unwrap_or(self.stored_at)
            .max(self.stored_at)
    }

    /// `host/name version [platform]`.
    pub fn label(&self) -> String {
        match &self.platform {
            Some(p) => format!("{}/{} {} {p}", self.host, self.name, self.version),
            None => format!("{}/{} {}", self.host, self.name, self.version),
        }
    }

    /// The key of the pin mark that keeps this unit.
    pub fn pin_key(&self) -> String {
        match &self.platform {
            Some(p) => format!("pins/{}/{p}", self.dir),
            None => format!("pins/{}", self.dir),
        }
    }
}

/// The stored units, and the objects they share.
#[derive(Debug, Default)]
pub struct Inventory {
    pub units: Vec<Unit>,
    /// SHA256SUMS and signature by provider version folder.
    pub shared: HashMap<String, Vec<Object>>,
    /// Objects in no unit (version lists, pins, access records).
    pub other_bytes: u64,
    pub other_objects: usize,
}

impl Inventory {
    /// Groups `objects` into units; `access` gives last reads by key, `pins` the pin keys.
    pub fn build(
        objects: Vec<Object>,
        access: &HashMap<String, u64>,
        pins: &HashSet<String>,
    ) -> Inventory {
        let mut inv = Inventory::default();
        let mut units: BTreeMap<(String, Option<String>), Unit> = BTreeMap::new();
        for o in objects {
            let parts: Vec<&str> = o.key.as_str().split('/').collect();
            let placed = match parts.first() {
                Some(&"providers") if parts.len() >= 6 => {
                    let dir = parts[..5].join("/");
                    let rest = &parts[5..];
                    let platform = match rest {
                        ["download", leaf] => leaf.strip_suffix(".json").map(str::to_owned),
                        [leaf] => zip_platform(leaf),
                        _ => None,
                    };
                    match (platform, rest) {
                        (Some(p), _) => Some((dir, Some(p), Kind::Provider)),
                        (None, ["SHA256SUMS" | "SHA256SUMS.sig"]) => {
                            inv.shared.entry(dir).or_default().push(o.clone());
                            continue;
                        }
                        _ => None,
                    }
                }
                Some(&"modules") if parts.len() >= 7 => {
                    Some((parts[..6].join("/"), None, Kind::Module))
                }
                _ => None,
            };
            let Some((dir, platform, kind)) = placed else {
                inv.other_bytes += o.size;
                inv.other_objects += 1;
                continue;
            };
            let seg: Vec<&str> = dir.split('/').collect();
            let unit = units
                .entry((dir.clone(), platform.clone()))
                .or_insert_with(|| Unit {
                    kind,
                    host: seg[1].to_owned(),
                    name: seg[2..seg.len() - 1].join("/"),
                    version: seg[seg.len() - 1].to_owned(),
                    platform,
                    size: 0,
                    stored_at: o.stored_at,
                    last_access: None,
                    pinned: false,
                    keys: Vec::new(),
                    dir: dir.clone(),
                });
            unit.size += o.size;
            unit.stored_at = unit.stored_at.min(o.stored_at);
            if let Some(at) = access.get(o.key.as_str()) {
                unit.last_access = Some(unit.last_access.map_or(*at, |a| a.max(*at)));
            }
            unit.keys.push(o.key);
        }
        inv.units = units.into_values().collect();
        for u in &mut inv.units {
            u.pinned = pins.contains(&u.pin_key());
        }
        inv
    }

    /// Bytes stored, all objects counted.
    pub fn stored_bytes(&self) -> u64 {
        self.units.iter().map(|u| u.size).sum::<u64>()
            + self.shared.values().flatten().map(|o| o.size).sum::<u64>()
            + self.other_bytes
    }

    /// Objects stored, all counted.
    pub fn objects(&self) -> usize {
        self.units.iter().map(|u| u.keys.len()).sum::<usize>()
            + self.shared.values().map(Vec::len).sum::<usize>()
            + self.other_objects
    }
}

/// `_{os}_{arch}.zip` or `.zip.h1` at the end of a provider file name.
fn zip_platform(leaf: &str) -> Option<String> {
    let stem = leaf
        .strip_suffix(".zip")
        .or_else(|| leaf.strip_suffix(".zip.h1"))?;
    let mut it = stem.rsplitn(3, '_');
    let arch = it.next()?;
    let os = it.next()?;
    it.next()?;
    Some(format!("{os}_{arch}"))
}

/// Why a unit goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The store is over `storage.max_size`.
    Size,
    /// Not read for `cache.evict_unused_after`.
    Unused,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Size => "size",
            Reason::Unused => "unused",
        }
    }
}

/// One unit to evict, with the shared objects of its version when it is the last platform.
#[derive(Debug, Clone, Serialize)]
pub struct Eviction {
    #[serde(flatten)]
    pub unit: Unit,
    pub reason: Reason,
    #[serde(skip)]
    pub keys: Vec<StorageKey>,
    pub bytes: u64,
}

/// The limits eviction keeps.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub max_size: Option<u64>,
    pub unused_after: Option<Duration>,
}

/// What to evict, least recently used first: units unused past the limit, then more until the
/// store is at or under its size. Pinned units and those `busy` says are in use stay.
pub fn plan(
    inv: &Inventory,
    limits: Limits,
    now: u64,
    busy: &dyn Fn(&Unit) -> bool,
) -> Vec<Eviction> {
    let (busy_units, mut order): (Vec<&Unit>, Vec<&Unit>) = inv
        .units
        .iter()
        .filter(|u| !u.pinned)
        .partition(|u| busy(u));
    order.sort_by_key(|u| (u.last_used(), u.stored_at));
    // Platforms of each version that stay, to know when SHA256SUMS goes too.
    let mut left: HashMap<&str, usize> = HashMap::new();
    for u in inv.units.iter().filter(|u| u.kind == Kind::Provider) {
        *left.entry(u.dir.as_str()).or_default() += 1;
    }
    // Units in use now go on a later pass; newer units are not evicted to make up for them.
    let mut total = inv.stored_bytes() - busy_units.iter().map(|u| u.size).sum::<u64>();
    let mut out = Vec::new();
    for u in order {
        let unused = limits
            .unused_after
            .is_some_and(|after| now.saturating_sub(u.last_used()) >= after.as_secs());
        let over = limits.max_size.is_some_and(|max| total > max);
        let reason = match (unused, over) {
            (true, _) => Reason::Unused,
            (false, true) => Reason::Size,
            (false, false) => continue,
        };
        let mut keys = u.keys.clone();
        let mut bytes = u.size;
        if u.kind == Kind::Provider {
            let n = left.get_mut(u.dir.as_str()).expect("counted");
            *n -= 1;
            if *n == 0 {
                for o in inv.shared.get(&u.dir).into_iter().flatten() {
                    keys.push(o.key.clone());
                    bytes += o.size;
                }
            }
        }
        total = total.saturating_sub(bytes);
        out.push(Eviction {
            unit: u.clone(),
            reason,
            keys,
            bytes,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(key: &str, size: u64, at: u64) -> Object {
        Object {
            key: StorageKey::parse(key).unwrap(),
            size,
            stored_at: at,
        }
    }

    const P: &str = "providers/registry.terraform.io/hashicorp/aws";

    fn store() -> Vec<Object> {
        vec![
            obj(&format!("{P}/versions.json"), 10, 1),
            obj(&format!("{P}/5.0.0/download/linux_amd64.json"), 1, 1),
            obj(
                &format!("{P}/5.0.0/terraform-provider-aws_5.0.0_linux_amd64.zip"),
                100,
                1,
            ),
            obj(
                &format!("{P}/5.0.0/terraform-provider-aws_5.0.0_linux_amd64.zip.h1"),
                1,
                1,
            ),
            obj(&format!("{P}/5.0.0/download/darwin_arm64.json"), 1, 2),
            obj(
                &format!("{P}/5.0.0/terraform-provider-aws_5.0.0_darwin_arm64.zip"),
                100,
                2,
            ),
            obj(&format!("{P}/5.0.0/SHA256SUMS"), 2, 1),
            obj(&format!("{P}/5.0.0/SHA256SUMS.sig"), 2, 1),
            obj(
                "modules/registry.terraform.io/ns/vpc/aws/1.0.0/location.json",
                1,
                3,
            ),
            obj(
                "modules/registry.terraform.io/ns/vpc/aws/1.0.0/git-abc.tar.gz",
                50,
                3,
            ),
        ]
    }

    #[test]
    fn objects_group_into_units_and_version_lists_into_none() {
        let inv = Inventory::build(store(), &HashMap::new(), &HashSet::new());
        let labels: Vec<String> = inv.units.iter().map(Unit::label).collect();
        assert_eq!(
            labels,
            [
                "registry.terraform.io/ns/vpc/aws 1.0.0",
                "registry.terraform.io/hashicorp/aws 5.0.0 darwin_arm64",
                "registry.terraform.io/hashicorp/aws 5.0.0 linux_amd64",
            ]
        );
        assert_eq!(inv.units[2].size, 102);
        assert_eq!(inv.stored_bytes(), 268);
        assert_eq!(inv.objects(), 10);
    }

    #[test]
    fn least_recently_used_goes_first_and_sums_go_with_the_last_platform() {
        let mut access = HashMap::new();
        // linux was read last; the module long ago.
        access.insert(
            format!("{P}/5.0.0/terraform-provider-aws_5.0.0_linux_amd64.zip"),
            100,
        );
        access.insert(
            "modules/registry.terraform.io/ns/vpc/aws/1.0.0/git-abc.tar.gz".to_owned(),
            4,
        );
        let inv = Inventory::build(store(), &access, &HashSet::new());
        let limits = Limits {
            max_size: Some(120),
            unused_after: None,
        };
        let plan = plan(&inv, limits, 200, &|_| false);
        let labels: Vec<String> = plan.iter().map(|e| e.unit.label()).collect();
        // darwin (used at 2), then the module (4): 268 - 101 - 51 = 116 <= 120.
        assert_eq!(
            labels,
            [
                "registry.terraform.io/hashicorp/aws 5.0.0 darwin_arm64",
                "registry.terraform.io/ns/vpc/aws 1.0.0",
            ]
        );
        assert!(plan.iter().all(|e| e.reason == Reason::Size));
        // Not the last platform: the sums stay.
        assert!(!plan[0].keys.iter().any(|k| k.leaf() == "SHA256SUMS"));
        // Down to nothing: the last platform takes the sums and signature.
        let all = super::plan(
            &inv,
            Limits {
                max_size: Some(1),
                unused_after: None,
            },
            200,
            &|_| false,
        );
        let linux = all
            .iter()
            .find(|e| e.unit.platform.as_deref() == Some("linux_amd64"))
            .unwrap();
        assert_eq!(
            linux
                .keys
                .iter()
                .filter(|k| k.leaf().starts_with("SHA256SUMS"))
                .count(),
            2
        );
    }

    #[test]
    fn pinned_and_busy_units_stay_and_unused_ones_go_whatever_the_size() {
        let mut pins = HashSet::new();
        pins.insert(format!("pins/{P}/5.0.0/darwin_arm64"));
        let inv = Inventory::build(store(), &HashMap::new(), &pins);
        let busy = |u: &Unit| u.kind == Kind::Module;
        let plan = plan(
            &inv,
            Limits {
                max_size: Some(1),
                unused_after: None,
            },
            10,
            &busy,
        );
        let labels: Vec<String> = plan.iter().map(|e| e.unit.label()).collect();
        assert_eq!(
            labels,
            ["registry.terraform.io/hashicorp/aws 5.0.0 linux_amd64"]
        );
        let unused = super::plan(
            &inv,
            Limits {
                max_size: None,
                unused_after: Some(Duration::from_secs(5)),
            },
            7,
            &|_| false,
        );
        // Stored at 1 and 2 are 6 and 5 s old; the module (3) is 4 s old; darwin is pinned.
        let labels: Vec<String> = unused.iter().map(|e| e.unit.label()).collect();
        assert_eq!(
            labels,
            ["registry.terraform.io/hashicorp/aws 5.0.0 linux_amd64"]
        );
        assert_eq!(unused[0].reason, Reason::Unused);
    }
}
