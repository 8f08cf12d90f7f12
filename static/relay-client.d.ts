// Type declarations for relay-client.js (relay protocol version 1; see docs/protocol.md).

export const PROTOCOL: 1;

export interface RelayClientOptions {
  /** Interests sent with join (at most 10 strings of 1-32 characters). */
  interests: string[];
  /** ms: the first reconnect waits up to this long (full jitter). Default 500. */
  initialDelay: number;
  /** ms: no reconnect waits longer. Default 15000. */
  maxDelay: number;
  /** Failed attempts on one URL before trying the next. Default 3. */
  attemptsPerUrl: number;
  /** ms before an attempt that has not opened counts as failed. Default 10000. */
  connectTimeout: number;
  /** ms of quiet before the client pings the relay. Default 25000. */
  pingInterval: number;
  /** ms to wait for anything after that ping before giving the connection up. Default 10000. */
  pongTimeout: number;
  /** When the peer leaves, join again (the relay leaves a client idle after peer_left). Default true. */
  rejoinAfterPeerLeft: boolean;
  /** A JWT for relays that require one (sent as the relay-jwt subprotocol), or a function returning one per connection. */
  token: string | (() => string) | null;
  /** Signals kept while a lost connection is being resumed. Default 100. */
  maxQueuedSignals: number;
  /** After attemptsPerUrl failed WebSockets to a relay whose /healthz answers, use its HTTP fallback. Default true. */
  fallback: boolean;
  /** ms: on the HTTP fallback, how often to try a WebSocket again (and move back to it). Default 60000. */
  upgradeInterval: number;
}

export const DEFAULTS: Readonly<RelayClientOptions>;

export interface RTCIceServerInit {
  urls: string | string[];
  username?: string;
  credential?: string;
}

export interface QueuedMessage {
  type: "queued";
  position: number;
  queue_size: number;
}

export interface MatchedMessage {
  type: "matched";
  session_id: string;
  peer_id: string;
  initiator: boolean;
  interests: string[];
  ice_servers: RTCIceServerInit[];
}

export interface SignalMessage {
  type: "signal";
  data: Record<string, unknown>;
  /** This signal's number for this client (1, 2, ...): resume asks for those after the last one seen. */
  n: number;
}

export interface ResumedMessage {
  type: "resumed";
  client_id: string;
  resume_token: string;
  state: "idle" | "queued" | "matched";
  session_id?: string;
  peer_id?: string;
  position?: number;
  queue_size?: number;
}

export interface PeerLeftMessage {
  type: "peer_left";
  session_id: string;
  reason: "next" | "left" | "disconnected" | "overflow";
}

export interface ErrorMessage {
  type?: "error";
  code:
    | "bad_json" | "bad_message" | "unknown_type" | "not_matched" | "already_matched" | "rate_limited"
    | "resume_failed" | "protocol";
  message: string;
}

export interface EndedDetail {
  session_id: string;
  reason: string;
  /** "peer": peer_left; "self": next, leave or close; "connection": the relay connection dropped and could not be resumed. */
  by: "peer" | "self" | "connection";
  /** The relay had lost the session (it restarted) and the call went on without it. */
  detached: boolean;
}

export interface RelayClientEventMap {
  connected: CustomEvent<{ clientId: string; url: string; resumed?: boolean }>;
  queued: CustomEvent<QueuedMessage>;
  matched: CustomEvent<MatchedMessage>;
  signal: CustomEvent<SignalMessage>;
  peerleft: CustomEvent<PeerLeftMessage>;
  ended: CustomEvent<EndedDetail>;
  resumed: CustomEvent<ResumedMessage>;
  peerreconnecting: CustomEvent<{ type: "peer_reconnecting"; session_id: string }>;
  peerresumed: CustomEvent<{ type: "peer_resumed"; session_id: string }>;
  reconnecting: CustomEvent<{ attempt: number; delay: number; url: string }>;
  disconnected: CustomEvent<{ code: number; reason: string; willReconnect: boolean }>;
  error: CustomEvent<ErrorMessage>;
  /** The client now reaches the relay this way (see RelayClient.transport). */
  transport: CustomEvent<{ transport: "websocket" | "fallback" }>;
  /** Cancelable: the relay lost the session; preventDefault() keeps the call going without it. */
  sessionlost: CustomEvent<MatchedMessage>;
}

/** Delay in ms before reconnect attempt `attempt` (0 first): uniform in [0, min(maxDelay, initialDelay * 2^attempt)). */
export function backoffDelay(
  attempt: number,
  options: { initialDelay: number; maxDelay: number },
  random?: () => number,
): number;

/** The relay's HTTP base for a WebSocket URL: `wss://a.example/ws` -> `https://a.example`. */
export function httpBase(url: string): string;
/** The URL a reconnection opens: the relay's with `?resume=<clientId>` (a cluster on Fly.io routes it to the client's machine). */
export function resumeUrl(url: string, clientId: string): string;

/** One Server-Sent Events block of the fallback stream. */
export function parseEvent(block: string): { event: string; data: string | null; comment: boolean };

/** Characters of messages one fallback POST carries at most. */
export const MAX_POST_CHARS: number;

/** The relay's HTTP fallback behind the part of the WebSocket interface RelayClient uses. */
export class FallbackSocket {
  constructor(
    url: string,
    options?: { token?: string | null; fetch?: typeof fetch; timers?: { setTimeout: typeof setTimeout } },
  );
  readonly url: string;
  readonly readyState: 0 | 1 | 3;
  onopen: ((event: object) => void) | null;
  onmessage: ((event: { data: string }) => void) | null;
  onclose: ((event: { code: number; reason: string; wasClean: boolean }) => void) | null;
  onerror: ((event: object) => void) | null;
  send(text: string): void;
  close(code?: number, reason?: string): void;
}

/** The same URL until it failed `attemptsPerUrl` times, then the next; back to the first after a success. */
export class UrlRotation {
  constructor(urls: string[], attemptsPerUrl: number);
  readonly urls: string[];
  readonly current: string;
  index: number;
  failures: number;
  failed(): void;
  succeeded(): void;
}

/** ICE candidates that arrived before the remote description, kept in order. */
export class CandidateQueue {
  pending: RTCIceCandidateInit[];
  ready: boolean;
  /** The candidate if it can be added now, else null (kept). */
  push(candidate: RTCIceCandidateInit): RTCIceCandidateInit | null;
  /** Marks the remote description set; returns the kept candidates. */
  drain(): RTCIceCandidateInit[];
  reset(): void;
}

export class RelayClient extends EventTarget {
  constructor(
    urls: string | string[],
    options?: Partial<RelayClientOptions> & {
      WebSocket?: typeof WebSocket;
      timers?: { setTimeout: typeof setTimeout; clearTimeout: typeof clearTimeout };
      random?: () => number;
      fetch?: typeof fetch;
    },
  );
  readonly options: RelayClientOptions;
  interests: string[];
  readonly connection: "connecting" | "open" | "reconnecting" | "closed";
  readonly state: "idle" | "queued" | "matched";
  readonly clientId: string | null;
  readonly resumeToken: string | null;
  /** The number of the last signal received. */
  readonly lastSignal: number;
  readonly session: MatchedMessage | null;
  /** In a call the relay lost (it restarted): nothing is signaled; next() and leave() still work. */
  readonly detached: boolean;
  readonly url: string | null;
  /** How the client reaches the relay: a WebSocket, or the HTTP fallback (where WebSockets are blocked). */
  readonly transport: "websocket" | "fallback";
  join(options?: { interests?: string[] }): void;
  next(): void;
  leave(): void;
  /** Report the peer: the session ends, the two are never paired again. False when not matched. */
  report(reason?: string): boolean;
  /** The peer ended a detached call (it said so over the data channel). */
  peerGone(reason?: string): void;
  signal(data: Record<string, unknown>): boolean;
  close(): void;
  addEventListener<K extends keyof RelayClientEventMap>(
    type: K,
    listener: (event: RelayClientEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  removeEventListener<K extends keyof RelayClientEventMap>(
    type: K,
    listener: (event: RelayClientEventMap[K]) => void,
    options?: boolean | EventListenerOptions,
  ): void;
}

export interface PeerSessionEventMap {
  statechange: CustomEvent<{
    connectionState: RTCPeerConnectionState;
    iceConnectionState: RTCIceConnectionState;
    signalingState: RTCSignalingState;
    error?: string;
  }>;
  track: CustomEvent<RTCTrackEvent>;
  channelopen: CustomEvent<Record<string, never>>;
  message: CustomEvent<{ text: string }>;
  closed: CustomEvent<{ reason: string }>;
  candidateerror: CustomEvent<{ errorCode: number; errorText: string; url: string }>;
}

export class PeerSession extends EventTarget {
  constructor(
    client: RelayClient,
    options?: {
      stream?: MediaStream | null;
      onTrack?: (event: RTCTrackEvent) => void;
      rtcConfig?: RTCConfiguration;
    },
  );
  readonly client: RelayClient;
  stream: MediaStream | null;
  readonly pc: RTCPeerConnection | null;
  /** The "chat" data channel (text). */
  readonly channel: RTCDataChannel | null;
  /** The "control" data channel: {"bye": reason} when a side ends a call the relay lost. */
  readonly control: RTCDataChannel | null;
  readonly sessionId: string | null;
  readonly polite: boolean;
  /** This session's ICE server errors (the last 10), e.g. errorCode 401 for refused TURN credentials. */
  readonly candidateErrors: { errorCode: number; errorText: string; url: string }[];
  send(text: string): boolean;
  close(): void;
  addEventListener<K extends keyof PeerSessionEventMap>(
    type: K,
    listener: (event: PeerSessionEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  removeEventListener<K extends keyof PeerSessionEventMap>(
    type: K,
    listener: (event: PeerSessionEventMap[K]) => void,
    options?: boolean | EventListenerOptions,
  ): void;
}
