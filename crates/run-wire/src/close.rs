//! WebSocket close codes, one table for every door (mesh links, browser sessions,
//! automerge-repo connections). 4000-4999 is the application range; where a standard code
//! means the same, it is used.

/// The node is shutting down.
pub const GOING_AWAY: u16 = 1001;
/// A text frame that is not UTF-8.
pub const INVALID_DATA: u16 = 1007;
/// A message that did not arrive within its deadline once begun (a trickle holding memory).
pub const POLICY: u16 = 1008;
/// A frame or message past the size limit, or what the client sent would cost more than one message may (operations, inflated size).
pub const TOO_BIG: u16 = 1009;
/// The database is out of reach, or the door has no room: nothing from the client was taken.
pub const TRY_AGAIN_LATER: u16 = 1013;
/// Missing or wrong credentials.
pub const UNAUTHORIZED: u16 = 4001;
/// The other end speaks another protocol version, or sent what the protocol does not allow.
pub const PROTOCOL: u16 = 4002;
/// The mesh handshake went wrong.
pub const HANDSHAKE: u16 = 4003;
/// A node dialled itself.
pub const SELF_LINK: u16 = 4004;
/// This node has no mesh secret configured.
pub const NO_SECRET: u16 = 4005;
/// The other end did not prove itself (or answer heartbeats) in time.
pub const TIMEOUT: u16 = 4008;
/// The other end reads too slowly: its queue is full.
pub const TOO_SLOW: u16 = 4009;
/// The credential does not allow this (a read-only token sending changes).
pub const FORBIDDEN: u16 = 4403;
/// A peer with the same id joined on another connection.
pub const REPLACED: u16 = 4010;
/// The run was deleted (as HTTP's 410 Gone).
pub const GONE: u16 = 4410;
