import Foundation
import Testing
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// `hostnet-dnat render` without -f, against a live HTTPS API server on 127.0.0.1: the same objects as
/// examples/cluster.yaml must give byte-identical output, and the CLI's API error paths must give the
/// documented exit codes with nothing on stdout.
@Suite struct RenderFromAPITests {
    static let cidr = ["--external-ip-cidr", "192.0.2.0/24"]

    @Test(arguments: ["nft", "json"])
    func rendersTheSameAsFromTheFile(format: String) throws {
        let fromFile = try CLI.run(["render", "-f", "examples/cluster.yaml", "--format", format] + Self.cidr)
        try #require(fromFile.status == 0, "render -f failed: \(fromFile.stderr)")
        #expect(fromFile.stdout.contains("203.0.113.10"), "the file render has no mappings?")

        try FakeAPIServer.with { api in
            let r = try CLI.run(["render", "--kubeconfig", api.kubeconfig, "--context", "live", "--format", format] + Self.cidr,
                                prefix: api.cleanEnvironment)
            #expect(r.status == 0, "stderr: \(r.stderr)")
            #expect(r.stdout == fromFile.stdout, "stdout differs from render -f examples/cluster.yaml")
            #expect(r.stderr == fromFile.stderr, "stderr differs from render -f examples/cluster.yaml")

            // It really paged through both lists with the tokens it was handed, authenticated every time.
            let requests = try api.requests()
            #expect(requests.allSatisfy { $0.status == 200 }, "\(requests)")
            for (path, count) in [("/api/v1/services", 10), ("/apis/discovery.k8s.io/v1/endpointslices", 11)] {
                let pages = requests.filter { $0.path == path }
                #expect(pages.count == (count + FakeAPIServer.pageSize - 1) / FakeAPIServer.pageSize, "\(path): \(requests)")
                #expect(pages.first?.query["continue"] == nil, "\(path): the first page has no continue token")
                #expect(pages.dropFirst().allSatisfy { $0.query["continue"] != nil }, "\(path): \(requests)")
                #expect(pages.allSatisfy { $0.query["limit"] == ["500"] }, "\(path): \(requests)")
            }
        }
    }

    @Test(arguments: [("no-services", "services", ""), ("no-slices", "endpointslices", "discovery.k8s.io")])
    func forbiddenExits77NamingTheResource(context: String, resource: String, group: String) throws {
        try FakeAPIServer.with { api in
            let r = try CLI.run(["render", "--kubeconfig", api.kubeconfig, "--context", context] + Self.cidr,
                                prefix: api.cleanEnvironment)
            #expect(r.status == 77, "stderr: \(r.stderr)")
            #expect(r.stdout.isEmpty, "nothing may reach stdout on failure: \(r.stdout)")
            #expect(r.stderr.hasPrefix("hostnet-dnat: error: forbidden: "), "\(r.stderr)")
            #expect(r.stderr.contains("cannot list \(resource) in all namespaces"), "\(r.stderr)")
            // The server's own Status message is passed on.
            #expect(r.stderr.contains("\(resource) is forbidden: User \"system:serviceaccount:test:limited\""), "\(r.stderr)")
            if !group.isEmpty { #expect(r.stderr.contains("in API group \(group)"), "\(r.stderr)") }
            #expect(!r.stderr.contains(api.token(context)), "the bearer token leaked: \(r.stderr)")
            #expect(!r.stderr.contains("Fatal error"))
        }
    }

    @Test func rejectedTokenExits77() throws {
        try FakeAPIServer.with { api in
            let r = try CLI.run(["render", "--kubeconfig", api.kubeconfig, "--context", "stale"] + Self.cidr,
                                prefix: api.cleanEnvironment)
            #expect(r.status == 77, "stderr: \(r.stderr)")
            #expect(r.stdout.isEmpty)
            #expect(r.stderr.contains("unauthorized"), "\(r.stderr)")
            #expect(!r.stderr.contains(api.token("stale")), "the bearer token leaked: \(r.stderr)")
        }
    }

    @Test func unreachableServerExits69() throws {
        try FakeAPIServer.with { api in
            let started = Date()
            let r = try CLI.run(["render", "--kubeconfig", api.kubeconfig, "--context", "unreachable"] + Self.cidr,
                                prefix: api.cleanEnvironment)
            let elapsed = Date().timeIntervalSince(started)
            #expect(r.status == 69, "stderr: \(r.stderr)")
            #expect(r.stdout.isEmpty)
            #expect(r.stderr.contains("127.0.0.1:\(api.closedPort)"), "\(r.stderr)")
            #expect(!r.stderr.contains("Fatal error"))
            // A refused connection fails at once, not after the 30 s request timeout.
            #expect(elapsed < 25, "took \(elapsed) s")
        }
    }

    @Test func noConfigurationAtAllExits64() throws {
        let home = FileManager.default.temporaryDirectory.appendingPathComponent("hnd-nohome-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: home, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: home) }
        let r = try CLI.run(["render"] + Self.cidr, prefix: ["env", "-i", "HOME=\(home.path)", "PATH=/usr/bin:/bin"])
        #expect(r.status == 64, "stderr: \(r.stderr)")
        #expect(r.stdout.isEmpty)
        #expect(r.stderr.contains("no Kubernetes API configuration found"), "\(r.stderr)")
        #expect(r.stderr.contains("\(home.path)/.kube/config"), "\(r.stderr)")
        #expect(r.stderr.contains("--kubeconfig"), "\(r.stderr)")
    }
}

/// A python3 `http.server` over TLS on 127.0.0.1 serving examples/cluster.json's objects as a ServiceList and
/// an EndpointSliceList (3 items a page, with `continue` tokens), checking a bearer token per kubeconfig user;
/// plus a CA and server certificate made with openssl, a kubeconfig, and a loopback port bound but not
/// listening (connections to it are refused). Everything is removed by `with` whatever happens.
final class FakeAPIServer {
    static let pageSize = 3

    let directory: URL
    let kubeconfig: String
    let port: Int
    let closedPort: Int
    /// `env -i` with an empty HOME: no KUBECONFIG, no in-cluster variables, no proxies from the test's environment.
    let cleanEnvironment: [String]
    private let tokens: [String: String]
    private let server: BackgroundProcess
    private let closedSocket: Int32

    static func with(_ body: (FakeAPIServer) throws -> Void) throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("hnd-api-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let api = try FakeAPIServer(directory: dir)
        defer { api.stop() }
        try body(api)
    }

    func token(_ context: String) -> String { tokens[context] ?? "" }

    struct Request: CustomStringConvertible {
        let path: String
        let query: [String: [String]]
        let status: Int
        var description: String { "\(status) \(path) \(query)" }
    }

    /// What the server answered so far, in order.
    func requests() throws -> [Request] {
        let text = (try? String(contentsOf: directory.appendingPathComponent("requests.log"), encoding: .utf8)) ?? ""
        return try text.split(separator: "\n").map { line in
            guard let doc = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
                  let path = doc["path"] as? String, let query = doc["query"] as? [String: [String]],
                  let status = doc["status"] as? Int else { throw TestSupportError("bad request log line: \(line)") }
            return Request(path: path, query: query, status: status)
        }
    }

    private init(directory dir: URL) throws {
        directory = dir
        let path = dir.path
        let home = dir.appendingPathComponent("home")
        try FileManager.default.createDirectory(at: home, withIntermediateDirectories: true)
        cleanEnvironment = ["env", "-i", "HOME=\(home.path)", "PATH=/usr/bin:/bin"]

        // CA and a server certificate for IP 127.0.0.1.
        try TestCertificates.makeServer(in: path)

        // One token per kubeconfig user; "stale" is not known to the server.
        let tokens = ["live", "no-services", "no-slices", "stale", "unreachable"].reduce(into: [String: String]()) {
            $0[$1] = "\($1)-\(UUID().uuidString)"
        }
        self.tokens = tokens
        let forbidden: [String: [String]] = [tokens["live"]!: [], tokens["unreachable"]!: [],
                                             tokens["no-services"]!: ["services"], tokens["no-slices"]!: ["endpointslices"]]
        let config: [String: Any] = [
            "cert": "\(path)/server.crt", "key": "\(path)/server.key",
            "data": CLI.root.appendingPathComponent("examples/cluster.json").path,
            "log": "\(path)/requests.log", "portFile": "\(path)/port", "pageSize": Self.pageSize, "tokens": forbidden,
        ]
        try JSONSerialization.data(withJSONObject: config).write(to: dir.appendingPathComponent("server.json"))
        try Self.script.write(toFile: "\(path)/server.py", atomically: true, encoding: .utf8)

        // A port that refuses connections: bound, never listening, held until stop().
        let (socketFD, refusedPort) = try Self.boundButNotListening()
        closedSocket = socketFD
        closedPort = refusedPort
        do {
            server = try BackgroundProcess("python3", ["\(path)/server.py", "\(path)/server.json"], readyMarker: "READY",
                                           readyTimeout: 30)
            guard let text = try? String(contentsOfFile: "\(path)/port", encoding: .utf8), let p = Int(text) else {
                throw TestSupportError("the test API server wrote no port")
            }
            port = p
        } catch {
            close(socketFD)
            throw error
        }

        // certificate-authority is relative: it resolves against the kubeconfig's folder.
        // current-context points at the refusing port, so a --context that is not honoured shows.
        var users = "", contexts = ""
        for name in tokens.keys.sorted() {
            users += "- name: \(name)\n  user:\n    token: \(tokens[name]!)\n"
            contexts += "- name: \(name)\n  context:\n    cluster: \(name == "unreachable" ? "closed" : "live")\n    user: \(name)\n"
        }
        let kubeconfigText = """
            apiVersion: v1
            kind: Config
            current-context: unreachable
            clusters:
            - name: live
              cluster:
                server: https://127.0.0.1:\(port)
                certificate-authority: ca.crt
            - name: closed
              cluster:
                server: https://127.0.0.1:\(closedPort)
                certificate-authority: ca.crt
            users:
            \(users)contexts:
            \(contexts)
            """
        kubeconfig = "\(path)/kubeconfig"
        try kubeconfigText.write(toFile: kubeconfig, atomically: true, encoding: .utf8)
    }

    func stop() {
        server.stop()
        close(closedSocket)
    }

    private static func boundButNotListening() throws -> (Int32, Int) {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw TestSupportError("socket: \(String(cString: strerror(errno)))") }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = 0
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, len) == 0 && getsockname(fd, $0, &len) == 0
            }
        }
        guard ok else {
            let why = String(cString: strerror(errno))
            close(fd)
            throw TestSupportError("bind 127.0.0.1:0: \(why)")
        }
        return (fd, Int(UInt16(bigEndian: addr.sin_port)))
    }

    /// The server. Items lose `kind`/`apiVersion` as in a real list; continue tokens are opaque base64 that
    /// starts with "+/+/", so a client that does not %-encode them gets a 400.
    static let script = #"""
    import base64, json, os, ssl, sys, threading, urllib.parse
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    with open(sys.argv[1]) as f:
        config = json.load(f)
    PAGE = int(config["pageSize"])
    TOKENS = config["tokens"]  # bearer token -> resources it may not list
    with open(config["data"]) as f:
        everything = json.load(f)["items"]

    def strip(item):
        return {k: v for k, v in item.items() if k not in ("kind", "apiVersion")}

    ROUTES = {
        "/api/v1/services": ("services", "ServiceList", "v1", "",
                             [strip(i) for i in everything if i.get("kind") == "Service"]),
        "/apis/discovery.k8s.io/v1/endpointslices": ("endpointslices", "EndpointSliceList", "discovery.k8s.io/v1",
                                                     "discovery.k8s.io",
                                                     [strip(i) for i in everything if i.get("kind") == "EndpointSlice"]),
    }
    MAGIC = b"\xfb\xff\xbf"
    log_lock = threading.Lock()

    def encode_continue(resource, start):
        return base64.b64encode(MAGIC + json.dumps({"r": resource, "start": start}).encode()).decode()

    def decode_continue(token, resource):
        raw = base64.b64decode(token, validate=True)
        if not raw.startswith(MAGIC):
            raise ValueError("bad prefix")
        doc = json.loads(raw[len(MAGIC):])
        if doc["r"] != resource:
            raise ValueError("token of another resource")
        return int(doc["start"])

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):
            self.request.settimeout(30)
            self.request.do_handshake()
            super().setup()

        def log_message(self, *args):
            pass

        def record(self, entry):
            with log_lock, open(config["log"], "a") as f:
                f.write(json.dumps(entry) + "\n")

        def reply(self, code, doc):
            body = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def status(self, code, reason, message, details=None):
            doc = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": message, "reason": reason, "code": code}
            if details:
                doc["details"] = details
            self.reply(code, doc)
            return code

        def do_GET(self):
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
            code = self.answer(url.path, query)
            self.record({"path": url.path, "query": query, "status": code})

        def answer(self, path, query):
            auth = self.headers.get("Authorization", "")
            token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
            if token not in TOKENS:
                return self.status(401, "Unauthorized", "Unauthorized")
            route = ROUTES.get(path)
            if route is None:
                return self.status(404, "NotFound", "the server could not find the requested resource")
            resource, list_kind, api_version, group, items = route
            if resource in TOKENS[token]:
                return self.status(403, "Forbidden",
                                   '%s is forbidden: User "system:serviceaccount:test:limited" cannot list resource "%s" '
                                   'in API group "%s" at the cluster scope' % (resource, resource, group),
                                   {"kind": resource, "group": group} if group else {"kind": resource})
            start = 0
            if "continue" in query:
                try:
                    start = decode_continue(query["continue"][0], resource)
                except Exception as e:
                    return self.status(400, "BadRequest", "invalid continue token: %s" % e)
            end = len(items)
            if "limit" in query:
                end = min(end, start + min(int(query["limit"][0]), PAGE))
            metadata = {"resourceVersion": "4242"}
            if end < len(items):
                metadata["continue"] = encode_continue(resource, end)
                metadata["remainingItemCount"] = len(items) - end
            self.reply(200, {"kind": list_kind, "apiVersion": api_version, "metadata": metadata,
                             "items": items[start:end]})
            return 200

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):
            pass  # keep stderr quiet: nobody drains it once the server is ready

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config["cert"], config["key"])
    server = Server(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    with open(config["portFile"] + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    os.rename(config["portFile"] + ".tmp", config["portFile"])
    print("READY", flush=True)
    server.serve_forever()
    """#
}
