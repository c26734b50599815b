import AsyncHTTPClient
import Foundation
import KubeObjects
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL

/// One HTTPS client bound to one API server and one identity, for the duration of a `load` or of one
/// list+watch loop. Used from a single task; not shared.
final class APISession {
    let connection: ClusterConnection
    let timeout: Duration
    let environment: [String: String]
    /// How long a watch may stay silent before its connection counts as dead (nil: this session does not watch).
    let watchReadTimeout: Duration?
    private var client: HTTPClient
    /// A second client for watches: the same TLS and identity, but a read timeout longer than the watch's
    /// `timeoutSeconds`, so the request timeout does not cut a quiet watch short.
    private var watchClient: HTTPClient?
    private var execCredential: ExecPlugin.Credential?
    /// Secrets that must never appear in a message.
    private var secrets: [String] = []

    private init(connection: ClusterConnection, timeout: Duration, environment: [String: String],
                 watchReadTimeout: Duration?, client: HTTPClient, watchClient: HTTPClient?,
                 execCredential: ExecPlugin.Credential?) {
        self.connection = connection
        self.timeout = timeout
        self.environment = environment
        self.watchReadTimeout = watchReadTimeout
        self.client = client
        self.watchClient = watchClient
        self.execCredential = execCredential
        rememberSecrets()
    }

    static func open(_ connection: ClusterConnection, timeout: Duration, environment: [String: String],
                     watchReadTimeout: Duration? = nil) async throws(KubernetesAPIError) -> APISession {
        var cred: ExecPlugin.Credential? = nil
        if let exec = connection.auth.exec {
            cred = try await ExecPlugin.run(exec, cluster: connection.clusterInfoForExec, environment: environment,
                                            timeout: max(timeout, .seconds(10)))
        }
        let (client, watchClient) = try makeClients(connection, execCredential: cred, timeout: timeout,
                                                    watchReadTimeout: watchReadTimeout)
        return APISession(connection: connection, timeout: timeout, environment: environment,
                          watchReadTimeout: watchReadTimeout, client: client, watchClient: watchClient,
                          execCredential: cred)
    }

    func close() async {
        try? await client.shutdown()
        try? await watchClient?.shutdown()
    }

    private func rememberSecrets() {
        var s: [String] = []
        if let t = connection.auth.token { s.append(t) }
        if let p = connection.auth.password {
            s.append(p)
            s.append(Data("\(connection.auth.username ?? ""):\(p)".utf8).base64EncodedString())
        }
        if let t = execCredential?.token { s.append(t) }
        secrets = s
    }

    func redact(_ e: KubernetesAPIError) -> KubernetesAPIError {
        var all = secrets
        if let t = try? currentFileToken() { all.append(t) }
        return e.redacting(all)
    }

    /// `text` with every secret of this session replaced (for messages built outside a KubernetesAPIError).
    func redacted(_ text: String) -> String {
        redact(KubernetesAPIError(.badData, text)).description
    }

    // MARK: TLS and the client

    /// The request client, and the watch client when `watchReadTimeout` is set. Only the TLS configuration can
    /// fail, and it is built before either client exists.
    static func makeClients(_ connection: ClusterConnection, execCredential: ExecPlugin.Credential?, timeout: Duration,
                            watchReadTimeout: Duration?) throws(KubernetesAPIError) -> (HTTPClient, HTTPClient?) {
        let tls = try tlsConfiguration(connection, execCredential: execCredential)
        return (makeClient(connection, tls: tls, timeout: timeout),
                watchReadTimeout.map { makeClient(connection, tls: tls, timeout: timeout, readTimeout: $0) })
    }

    /// `readTimeout` (default: `timeout`) is AsyncHTTPClient's idle read timeout: the longest silence between
    /// two reads, which for a watch is also the longest time without an event or bookmark.
    static func makeClient(_ connection: ClusterConnection, tls: TLSConfiguration, timeout: Duration,
                           readTimeout: Duration? = nil) -> HTTPClient {
        var config = HTTPClient.Configuration()
        config.tlsConfiguration = tls
        // The bearer token must never follow a redirect to another host; the API server does not redirect.
        config.redirectConfiguration = .disallow
        config.timeout = .init(connect: timeAmount(timeout), read: timeAmount(readTimeout ?? timeout))
        // Fail at once when the server refuses; the pool would otherwise retry until the deadline.
        config.connectionPool.retryConnectionEstablishment = false
        if let sni = sniOverride(connection) {
            config.dnsOverride = [sni: connection.server.host]
        }
        return HTTPClient(eventLoopGroup: MultiThreadedEventLoopGroup.singleton, configuration: config)
    }

    /// `tls-server-name`: the URL carries that name (SNI and certificate check), the connection goes to the
    /// real host through AsyncHTTPClient's DNS override.
    static func sniOverride(_ connection: ClusterConnection) -> String? {
        guard let name = connection.tlsServerName, name != connection.server.host,
              connection.server.scheme == "https", !name.contains(":"),
              name.contains(where: { $0.isLetter }) else { return nil }
        return name
    }

    static func tlsConfiguration(_ connection: ClusterConnection,
                                 execCredential: ExecPlugin.Credential?) throws(KubernetesAPIError) -> TLSConfiguration {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.minimumTLSVersion = .tlsv12
        // After a timeout a hung server does not answer close_notify either; don't wait 5 s for it.
        tls.shutdownTimeout = .seconds(1)
        switch connection.trust {
        case .systemRoots:
            tls.trustRoots = .default
            tls.certificateVerification = .fullVerification
        case .certificateAuthority(let ca):
            let certs: [NIOSSLCertificate]
            do {
                certs = try NIOSSLCertificate.fromPEMBytes(ca.bytes)
            } catch {
                throw KubernetesAPIError(.configuration, "certificate authority \(ca.origin): not PEM certificates (\(error))")
            }
            guard !certs.isEmpty else {
                throw KubernetesAPIError(.configuration, "certificate authority \(ca.origin): holds no PEM certificate")
            }
            tls.trustRoots = .certificates(certs)
            tls.certificateVerification = .fullVerification
        case .insecureSkipVerify:
            tls.certificateVerification = .none
        }
        let certMaterial = execCredential?.clientCertificate ?? connection.auth.clientCertificate
        let keyMaterial = execCredential?.clientKey ?? connection.auth.clientKey
        if let certMaterial, let keyMaterial {
            let chain: [NIOSSLCertificate]
            do {
                chain = try NIOSSLCertificate.fromPEMBytes(certMaterial.bytes)
            } catch {
                throw KubernetesAPIError(.configuration, "client certificate \(certMaterial.origin): not a PEM certificate (\(error))")
            }
            guard !chain.isEmpty else {
                throw KubernetesAPIError(.configuration, "client certificate \(certMaterial.origin): holds no PEM certificate")
            }
            let key: NIOSSLPrivateKey
            do {
                key = try NIOSSLPrivateKey(bytes: keyMaterial.bytes, format: .pem)
            } catch {
                // Never echo the key; the error type carries no key bytes.
                throw KubernetesAPIError(.configuration, "client key \(keyMaterial.origin): not a PEM private key")
            }
            tls.certificateChain = chain.map { .certificate($0) }
            tls.privateKey = .privateKey(key)
        }
        return tls
    }

    // MARK: credentials per request

    private func currentFileToken() throws(KubernetesAPIError) -> String? {
        guard let path = connection.auth.tokenFile else { return nil }
        let data: [UInt8]
        switch ConfigFile.read(path) {
        case .success(let d): data = d
        case .failure(.tooLarge):
            throw KubernetesAPIError(.configuration, "token file \(path) (\(connection.auth.identity)) is \(ConfigFile.tooLargeText)")
        case .failure:
            throw KubernetesAPIError(.configuration, "token file \(path) (\(connection.auth.identity)) cannot be read")
        }
        // client-go trims a token file (a trailing newline is normal there); what remains must fit a header.
        let token = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        if let why = CredentialCheck.problem(token) {
            throw KubernetesAPIError(.configuration, "token file \(path) (\(connection.auth.identity)): the token \(why); the value is not shown")
        }
        return token.isEmpty ? nil : token
    }

    /// The Authorization header: exec plugin token, else the token file (read again now), else the token,
    /// else basic auth.
    private func authorization() throws(KubernetesAPIError) -> String? {
        if let t = execCredential?.token { return "Bearer \(t)" }
        if let t = try currentFileToken() { return "Bearer \(t)" }
        if let t = connection.auth.token { return "Bearer \(t)" }
        if let u = connection.auth.username {
            let raw = "\(u):\(connection.auth.password ?? "")"
            return "Basic \(Data(raw.utf8).base64EncodedString())"
        }
        return nil
    }

    // MARK: GET

    struct Response {
        var status: Int
        var body: [UInt8]
        var retryAfter: Int?
    }

    /// The URL as shown in messages (the server's real address, not a tls-server-name).
    func displayURL(_ pathAndQuery: String) -> String {
        connection.server.display + pathAndQuery
    }

    func get(_ pathAndQuery: String) async throws(KubernetesAPIError) -> Response {
        var refreshedExec = false
        var attempts = 0
        while true {
            attempts += 1
            let response = try await getOnce(pathAndQuery)
            if try await shouldRetry(response, refreshedExec: &refreshedExec, attempts: attempts) { continue }
            return response
        }
    }

    /// 401 with an exec plugin: client-go runs the plugin again once when the server rejects its credential.
    /// 429/503 with Retry-After: wait (at most 10 s) and ask again, three times at most.
    private func shouldRetry(_ response: Response, refreshedExec: inout Bool,
                             attempts: Int) async throws(KubernetesAPIError) -> Bool {
        if response.status == 401, !refreshedExec, let exec = connection.auth.exec {
            refreshedExec = true
            execCredential = try await ExecPlugin.run(exec, cluster: connection.clusterInfoForExec,
                                                      environment: environment, timeout: max(timeout, .seconds(10)))
            rememberSecrets()
            let old = (client, watchClient)
            (client, watchClient) = try Self.makeClients(connection, execCredential: execCredential, timeout: timeout,
                                                         watchReadTimeout: watchReadTimeout)
            try? await old.0.shutdown()
            try? await old.1?.shutdown()
            return true
        }
        if (response.status == 429 || response.status == 503), attempts < 4, let wait = response.retryAfter {
            try? await Task.sleep(for: .seconds(min(max(wait, 1), 10)))
            return !Task.isCancelled
        }
        return false
    }

    private func makeRequest(_ pathAndQuery: String) throws(KubernetesAPIError) -> HTTPClientRequest {
        let server = connection.server
        let host = Self.sniOverride(connection) ?? server.hostForURL
        var request = HTTPClientRequest(url: "\(server.scheme)://\(host):\(server.port)\(server.basePath)\(pathAndQuery)")
        request.method = .GET
        request.headers.add(name: "Accept", value: "application/json")
        request.headers.add(name: "User-Agent", value: "hostnet-dnat")
        if let auth = try authorization() { request.headers.add(name: "Authorization", value: auth) }
        if let u = connection.auth.impersonateUser { request.headers.add(name: "Impersonate-User", value: u) }
        if let u = connection.auth.impersonateUID { request.headers.add(name: "Impersonate-Uid", value: u) }
        for g in connection.auth.impersonateGroups { request.headers.add(name: "Impersonate-Group", value: g) }
        return request
    }

    private func getOnce(_ pathAndQuery: String) async throws(KubernetesAPIError) -> Response {
        let req = try makeRequest(pathAndQuery)
        let client = self.client
        let timeout = self.timeout
        do {
            return try await withTimeout(timeout) {
                let response = try await client.execute(req, timeout: timeAmount(timeout))
                let body = try await response.body.collect(upTo: 1 << 30)
                let retryAfter = response.headers.first(name: "Retry-After").flatMap { Int($0.trimmingCharacters(in: .whitespaces)) }
                return Response(status: Int(response.status.code), body: Array(body.readableBytesView), retryAfter: retryAfter)
            }
        } catch {
            throw redact(TransportErrors.describe(error, pathAndQuery: pathAndQuery, connection: connection, timeout: timeout))
        }
    }

    // MARK: watch (a long GET whose body is read as it arrives)

    /// How a streamed GET ended.
    enum StreamEnd {
        /// A non-2xx answer (its body read whole, at most 1 MiB): the caller decides what it means.
        case answered(Response)
        /// A 2xx body that the server ended, or that `onChunk` stopped reading.
        case ended
        /// A 2xx body that broke off: the connection dropped, the server fell silent for longer than
        /// `watchReadTimeout`, or `onChunk` threw.
        case broken(KubernetesAPIError)
    }

    /// GETs `pathAndQuery` with the watch client and hands each body chunk of a 2xx answer to `onChunk` as it
    /// arrives (`onChunk` returns false to stop reading). Throws only when there is no answer at all (the
    /// connection or TLS failed, no response head within the request timeout, cancelled). The credential
    /// refresh and Retry-After handling of `get` apply.
    /// `onOpen` is called once the server has answered 2xx (the watch is established), before any chunk.
    func stream(_ pathAndQuery: String, onOpen: () -> Void = {},
                onChunk: (ByteBuffer) throws(KubernetesAPIError) -> Bool) async throws(KubernetesAPIError) -> StreamEnd {
        var refreshedExec = false
        var attempts = 0
        while true {
            attempts += 1
            let end = try await streamOnce(pathAndQuery, onOpen: onOpen, onChunk: onChunk)
            if case .answered(let response) = end,
               try await shouldRetry(response, refreshedExec: &refreshedExec, attempts: attempts) { continue }
            return end
        }
    }

    private func streamOnce(_ pathAndQuery: String, onOpen: () -> Void,
                            onChunk: (ByteBuffer) throws(KubernetesAPIError) -> Bool) async throws(KubernetesAPIError) -> StreamEnd {
        guard let client = watchClient, let silence = watchReadTimeout else {
            preconditionFailure("stream(_:) needs a session opened with a watchReadTimeout")
        }
        let req = try makeRequest(pathAndQuery)
        let response: HTTPClientResponse
        do {
            // The deadline covers the wait for the response head only (AsyncHTTPClient's rule); the body is
            // bounded by the idle read timeout and by the server's timeoutSeconds.
            response = try await client.execute(req, timeout: timeAmount(timeout))
        } catch {
            throw redact(TransportErrors.describe(error, pathAndQuery: pathAndQuery, connection: connection, timeout: timeout))
        }
        let status = Int(response.status.code)
        guard (200..<300).contains(status) else {
            let timeout = self.timeout
            let body: [UInt8]
            do {
                body = try await withTimeout(timeout) { Array(try await response.body.collect(upTo: 1 << 20).readableBytesView) }
            } catch {
                body = []  // the status alone says enough
            }
            let retryAfter = response.headers.first(name: "Retry-After").flatMap { Int($0.trimmingCharacters(in: .whitespaces)) }
            return .answered(Response(status: status, body: body, retryAfter: retryAfter))
        }
        onOpen()
        do {
            for try await chunk in response.body {
                if try !onChunk(chunk) { break }
            }
            return .ended
        } catch let error as KubernetesAPIError {
            return .broken(redact(error))
        } catch {
            let cause: String
            if let e = error as? HTTPClientError, e == .readTimeout {
                cause = "the server sent nothing (not even a bookmark) for \(seconds(silence)); the connection counts as dead"
            } else if let e = error as? HTTPClientError, e == .remoteConnectionClosed {
                cause = "the connection closed in the middle of the watch"
            } else if case .uncleanShutdown? = error as? NIOSSLError {
                cause = "the connection closed in the middle of the watch"
            } else {
                cause = TransportErrors.cause(error, connection: connection, timeout: silence)
            }
            return .broken(redact(KubernetesAPIError(.unavailable,
                "the watch from the API server at \(connection.server.display) (GET \(pathAndQuery)) broke off: \(cause)")))
        }
    }

    /// Turns a non-2xx answer into the error the user sees.
    func failure(_ response: Response, verb: String, resource: Resource, namespace: String?,
                 pathAndQuery: String) -> KubernetesAPIError {
        let status = StatusObject(response.body)
        let url = displayURL(pathAndQuery)
        let scope = namespace.map { "in namespace \"\($0)\"" } ?? "in all namespaces"
        let serverSaid = status?.message.map { ": \($0)" } ?? ""
        let grant = resource.group.isEmpty
            ? "grant \(verb) on \(resource.plural)"
            : "grant \(verb) on \(resource.plural) in API group \(resource.group)"
        var e: KubernetesAPIError
        switch response.status {
        case 401:
            e = KubernetesAPIError(.unauthorized,
                "unauthorized: the API server at \(connection.server.display) rejected the credentials of \(connection.auth.identity) (\(connection.origin))\(serverSaid). Check that the token or certificate is current",
                httpStatus: 401)
        case 403:
            e = KubernetesAPIError(.unauthorized,
                "forbidden: \(connection.auth.identity) cannot \(verb) \(resource.plural) \(scope) (GET \(url))\(serverSaid); \(grant) (see examples/deploy/rbac.yaml)",
                httpStatus: 403)
        case 404:
            e = KubernetesAPIError(.unavailable,
                "GET \(url): 404 not found\(serverSaid)" + (resource.group.isEmpty ? "" : "; the server does not serve \(resource.group)/\(resource.version) \(resource.plural) (Kubernetes 1.21 or later is needed)"),
                httpStatus: 404)
        case 400:
            e = KubernetesAPIError(.configuration, "GET \(url): the API server rejected the request\(serverSaid)", httpStatus: 400)
        default:
            let reason = status?.reason.map { " \($0)" } ?? ""
            e = KubernetesAPIError(.unavailable, "GET \(url): HTTP \(response.status)\(reason)\(serverSaid)", httpStatus: response.status)
        }
        return redact(e)
    }

    func badData(_ message: String) -> KubernetesAPIError {
        redact(KubernetesAPIError(.badData, message))
    }
}

/// A `kind: Status` reply (errors, 410 Gone).
struct StatusObject {
    var message: String?
    var reason: String?
    var code: Int?

    init?(_ body: [UInt8]) {
        guard let doc = try? JSONParser.parse(body) else { return nil }
        self.init(doc)
    }

    /// From a parsed object (the `object` of a watch ERROR event).
    init?(_ doc: JSONValue) {
        guard case .string("Status")? = doc["kind"] else { return nil }
        if case .string(let m)? = doc["message"], !m.isEmpty { message = InputErrorText.printable(m) }
        if case .string(let r)? = doc["reason"], !r.isEmpty { reason = r }
        if case .int(let c)? = doc["code"] { code = c }
    }
}

enum InputErrorText {
    /// One line, no control characters, at most 500 characters (server messages can be long).
    static func printable(_ s: String) -> String { InputError.printable(s, limit: 500) }
}

struct TimeoutError: Error {}

/// Runs `operation`, cancelling it after `limit`.
func withTimeout<T: Sendable>(_ limit: Duration, _ operation: @escaping @Sendable () async throws -> T) async throws -> T {
    try await withThrowingTaskGroup(of: T.self) { group in
        group.addTask { try await operation() }
        group.addTask {
            try await Task.sleep(for: limit)
            throw TimeoutError()
        }
        defer { group.cancelAll() }
        guard let first = try await group.next() else { throw TimeoutError() }
        return first
    }
}

/// `Duration` as NIO's `TimeAmount` (nanoseconds).
func timeAmount(_ d: Duration) -> TimeAmount {
    .nanoseconds(Int64(d.components.seconds) * 1_000_000_000 + Int64(d.components.attoseconds / 1_000_000_000))
}
