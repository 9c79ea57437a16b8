//! The router and presence table of one relay: which attached cell a message
//! goes to, who offers a service, and who must hear of presence changes.
//!
//! Pure: the shell tells it what happened (attach, announce, detach, watch)
//! and it answers with what to do (whom to deliver to, which presence
//! reports to send). It is generic over the link handle `H` the shell uses,
//! so tests drive it with plain numbers.
//!
//! Deterministic: every list it returns is in a fixed order, whatever the
//! history of the tables: cells by key (broadcast, service members,
//! discovery) and watchers by link id (presence reports). Its maps are
//! B-trees, so no hash seed reaches an output, and a run can be replayed.

use relay_codec::frame::PresenceInfo;
use relay_codec::{PublicKey, ServiceName};
use std::collections::{BTreeMap, BTreeSet};

/// Identifies one link (one QUIC connection) for the lifetime of the process.
pub type LinkId = u64;

struct Attached<H> {
    link: LinkId,
    handle: H,
    app_version: String,
    services: Vec<ServiceName>,
}

/// A presence report the shell must send on a watcher's link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceReport<H> {
    /// The watcher's link.
    pub to: H,
    /// Attached or detached.
    pub up: bool,
    /// Whom it is about.
    pub info: PresenceInfo,
}

/// What happened when a cell attached.
pub struct Attach<H> {
    /// An older link of the same key, which the shell must close: a cell
    /// that reconnects replaces its stale link.
    pub replaced: Option<H>,
    /// That older link's id.
    pub replaced_link: Option<LinkId>,
}

/// Where a message goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a, H> {
    /// To one attached cell.
    One(&'a H),
    /// To each of these (broadcast, service); may be empty.
    Many(Vec<&'a H>),
    /// The destination is not attached here.
    Unknown,
}

/// The presence table and routing decisions of one relay.
///
/// Bounded: at most `max_cells` attached cells (the shell also bounds links),
/// each with at most the services the codec's limits allow.
pub struct Router<H> {
    cells: BTreeMap<PublicKey, Attached<H>>,
    services: BTreeMap<ServiceName, BTreeSet<PublicKey>>,
    watchers: BTreeMap<LinkId, H>,
    max_cells: usize,
}

impl<H: Clone> Router<H> {
    /// An empty router holding at most `max_cells` attached cells.
    pub fn new(max_cells: usize) -> Self {
        Self {
            cells: BTreeMap::new(),
            services: BTreeMap::new(),
            watchers: BTreeMap::new(),
            max_cells,
        }
    }

    /// Number of attached cells.
    pub fn len(&self) -> usize {
        self.cells.len()
    }

    /// Whether no cell is attached.
    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// Whether another cell may attach.
    pub fn has_room(&self) -> bool {
        self.cells.len() < self.max_cells
    }

    /// The handle of the cell with `key`, if attached.
    pub fn get(&self, key: &PublicKey) -> Option<&H> {
        self.cells.get(key).map(|a| &a.handle)
    }

    /// A cell proved `key` on `link`. It is attached without services until
    /// it announces; watchers hear of it then (or now, if it never does:
    /// see [`announce`](Self::announce)).
    pub fn attach(
        &mut self,
        key: PublicKey,
        link: LinkId,
        handle: H,
    ) -> (Attach<H>, Vec<PresenceReport<H>>) {
        let old = self.cells.insert(
            key,
            Attached {
                link,
                handle,
                app_version: String::new(),
                services: Vec::new(),
            },
        );
        let replaced_link = old.as_ref().map(|o| o.link);
        let replaced = old.map(|o| {
            self.unindex(&key, &o.services);
            self.watchers.remove(&o.link);
            o.handle
        });
        let reports = self.reports(key, true, link);
        (
            Attach {
                replaced,
                replaced_link,
            },
            reports,
        )
    }

    /// The cell on `link` states its version and services (replacing any
    /// earlier announcement). Returns the presence reports for watchers.
    /// Ignored (empty) if `link` is not the cell's current link.
    pub fn announce(
        &mut self,
        key: PublicKey,
        link: LinkId,
        app_version: String,
        services: Vec<ServiceName>,
    ) -> Vec<PresenceReport<H>> {
        let Some(a) = self.cells.get_mut(&key).filter(|a| a.link == link) else {
            return Vec::new();
        };
        let old = std::mem::replace(&mut a.services, services.clone());
        a.app_version = app_version;
        self.unindex(&key, &old);
        for s in services {
            self.services.entry(s).or_default().insert(key);
        }
        self.reports(key, true, link)
    }

    /// The link ended. If it was the cell's current link, the cell is
    /// detached and watchers hear of it. Always forgets the link as a watcher.
    pub fn detach(&mut self, key: PublicKey, link: LinkId) -> Vec<PresenceReport<H>> {
        self.watchers.remove(&link);
        if self.cells.get(&key).is_none_or(|a| a.link != link) {
            return Vec::new();
        }
        let reports = self.reports(key, false, link);
        if let Some(a) = self.cells.remove(&key) {
            self.unindex(&key, &a.services);
        }
        reports
    }

    /// Starts or stops presence reports to `link`.
    pub fn watch(&mut self, link: LinkId, handle: H, on: bool) {
        if on {
            self.watchers.insert(link, handle);
        } else {
            self.watchers.remove(&link);
        }
    }

    /// The cells offering `service`, with their versions, at most `max`.
    pub fn discover(&self, service: &ServiceName, max: usize) -> Vec<(PublicKey, String)> {
        self.services
            .get(service)
            .into_iter()
            .flatten()
            .take(max)
            .filter_map(|k| self.cells.get(k).map(|a| (*k, a.app_version.clone())))
            .collect()
    }

    /// The current link of the cell with `key` and its handle, if attached.
    pub fn cell(&self, key: &PublicKey) -> Option<(LinkId, &H)> {
        self.cells.get(key).map(|a| (a.link, &a.handle))
    }

    /// The handles of every attached cell but `from`, by key: a broadcast's
    /// receivers. Allocates nothing.
    pub fn broadcast(&self, from: PublicKey) -> impl Iterator<Item = &H> + '_ {
        self.cells
            .iter()
            .filter(move |(k, _)| **k != from)
            .map(|(_, a)| &a.handle)
    }

    /// The handles of every cell offering `service` but `from`, by key: a
    /// service message's receivers. Allocates nothing.
    pub fn service_members<'a>(
        &'a self,
        service: &ServiceName,
        from: PublicKey,
    ) -> impl Iterator<Item = &'a H> + 'a {
        self.services
            .get(service)
            .into_iter()
            .flatten()
            .filter(move |k| **k != from)
            .filter_map(|k| self.cells.get(k).map(|a| &a.handle))
    }

    /// Where a message from `from` to one cell goes.
    pub fn route_cell(&self, dest: &PublicKey) -> Route<'_, H> {
        match self.cells.get(dest) {
            Some(a) => Route::One(&a.handle),
            None => Route::Unknown,
        }
    }

    /// Every attached cell but the sender, by key (as [`broadcast`](Self::broadcast), collected).
    pub fn route_broadcast(&self, from: &PublicKey) -> Route<'_, H> {
        Route::Many(self.broadcast(*from).collect())
    }

    /// Every cell offering `service` but the sender, by key (as
    /// [`service_members`](Self::service_members), collected).
    pub fn route_service(&self, service: &ServiceName, from: &PublicKey) -> Route<'_, H> {
        Route::Many(self.service_members(service, *from).collect())
    }

    fn unindex(&mut self, key: &PublicKey, services: &[ServiceName]) {
        for s in services {
            if let Some(set) = self.services.get_mut(s) {
                set.remove(key);
                if set.is_empty() {
                    self.services.remove(s);
                }
            }
        }
    }

    /// Reports about `key` for every watcher but the cell's own link.
    fn reports(&self, key: PublicKey, up: bool, own: LinkId) -> Vec<PresenceReport<H>> {
        let info = match self.cells.get(&key) {
            Some(a) => PresenceInfo {
                key,
                app_version: a.app_version.clone(),
                services: a.services.clone(),
            },
            None => PresenceInfo {
                key,
                app_version: String::new(),
                services: Vec::new(),
            },
        };
        self.watchers
            .iter()
            .filter(|(l, _)| **l != own)
            .map(|(_, h)| PresenceReport {
                to: h.clone(),
                up,
                info: info.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: u8) -> PublicKey {
        PublicKey([i; 32])
    }

    fn svc(s: &str) -> ServiceName {
        ServiceName::new(s).unwrap()
    }

    #[test]
    fn routes_to_attached_cells_only() {
        let mut r = Router::new(10);
        r.attach(k(1), 1, "a");
        r.attach(k(2), 2, "b");
        assert_eq!(r.route_cell(&k(2)), Route::One(&"b"));
        assert_eq!(r.route_cell(&k(3)), Route::Unknown);
        let Route::Many(mut all) = r.route_broadcast(&k(1)) else {
            panic!()
        };
        all.sort();
        assert_eq!(all, vec![&"b"]);
        r.detach(k(2), 2);
        assert_eq!(r.route_cell(&k(2)), Route::Unknown);
    }

    #[test]
    fn services_are_indexed_and_replaced_by_later_announcements() {
        let mut r = Router::new(10);
        r.attach(k(1), 1, 1);
        r.attach(k(2), 2, 2);
        r.announce(k(1), 1, "1.0".into(), vec![svc("chat"), svc("files")]);
        r.announce(k(2), 2, "2.0".into(), vec![svc("chat")]);
        let mut found = r.discover(&svc("chat"), 100);
        found.sort();
        assert_eq!(found, vec![(k(1), "1.0".into()), (k(2), "2.0".into())]);
        assert_eq!(r.route_service(&svc("chat"), &k(2)), Route::Many(vec![&1]));
        r.announce(k(1), 1, "1.1".into(), vec![svc("files")]);
        assert_eq!(r.discover(&svc("chat"), 100), vec![(k(2), "2.0".into())]);
        r.detach(k(2), 2);
        assert!(r.discover(&svc("chat"), 100).is_empty());
        assert_eq!(r.discover(&svc("files"), 100), vec![(k(1), "1.1".into())]);
    }

    #[test]
    fn a_reconnecting_cell_replaces_its_old_link_and_the_old_detach_is_ignored() {
        let mut r = Router::new(10);
        r.attach(k(1), 1, "old");
        r.announce(k(1), 1, "v".into(), vec![svc("chat")]);
        let (a, _) = r.attach(k(1), 2, "new");
        assert_eq!(a.replaced, Some("old"));
        // The announcement of the old link is gone with it.
        assert!(r.discover(&svc("chat"), 10).is_empty());
        // The stale link's end does not detach the new one.
        assert!(r.detach(k(1), 1).is_empty());
        assert_eq!(r.route_cell(&k(1)), Route::One(&"new"));
        // Announcements from the stale link are ignored.
        r.announce(k(1), 1, "v".into(), vec![svc("x")]);
        assert!(r.discover(&svc("x"), 10).is_empty());
    }

    #[test]
    fn watchers_hear_attach_announce_and_detach_but_not_about_themselves() {
        let mut r = Router::new(10);
        r.attach(k(9), 9, "w");
        r.watch(9, "w", true);
        let (_, reports) = r.attach(k(1), 1, "a");
        assert_eq!(reports.len(), 1);
        assert!(reports[0].up && reports[0].info.key == k(1) && reports[0].to == "w");
        let reports = r.announce(k(1), 1, "1".into(), vec![svc("chat")]);
        assert_eq!(reports[0].info.services, vec![svc("chat")]);
        let reports = r.detach(k(1), 1);
        assert_eq!(reports.len(), 1);
        assert!(!reports[0].up);
        // The watcher's own presence is not reported to itself.
        assert!(r.announce(k(9), 9, "1".into(), vec![]).is_empty());
        r.watch(9, "w", false);
        let (_, reports) = r.attach(k(2), 2, "b");
        assert!(reports.is_empty());
    }

    #[test]
    fn outputs_are_in_key_and_link_order_whatever_the_history() {
        let mut r = Router::new(10);
        // Watchers and cells attached out of order.
        for (key, link) in [(7, 30), (2, 10), (9, 20), (4, 40)] {
            r.attach(k(key), link, link);
            r.announce(k(key), link, String::new(), vec![svc("chat")]);
            r.watch(link, link, true);
        }
        let Route::Many(all) = r.route_broadcast(&k(0)) else {
            panic!()
        };
        assert_eq!(all, vec![&10, &40, &30, &20], "by key: 2, 4, 7, 9");
        let Route::Many(members) = r.route_service(&svc("chat"), &k(4)) else {
            panic!()
        };
        assert_eq!(members, vec![&10, &30, &20]);
        let found: Vec<PublicKey> = r
            .discover(&svc("chat"), 10)
            .into_iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(found, vec![k(2), k(4), k(7), k(9)]);
        let (_, reports) = r.attach(k(1), 50, 50);
        let to: Vec<u64> = reports.iter().map(|p| p.to).collect();
        assert_eq!(to, vec![10, 20, 30, 40], "by watcher link id");
    }

    #[test]
    fn capacity_is_reported() {
        let mut r = Router::new(2);
        r.attach(k(1), 1, ());
        assert!(r.has_room());
        r.attach(k(2), 2, ());
        assert!(!r.has_room());
        assert_eq!(r.len(), 2);
    }
}
