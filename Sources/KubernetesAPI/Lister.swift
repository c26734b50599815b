import KubeObjects

/// A listable resource.
struct Resource: Sendable {
    var plural: String
    var group: String
    var version: String
    var listKind: String

    static let services = Resource(plural: "services", group: "", version: "v1", listKind: "ServiceList")
    static let endpointSlices = Resource(plural: "endpointslices", group: "discovery.k8s.io", version: "v1",
                                         listKind: "EndpointSliceList")

    func path(namespace: String?) -> String {
        let root = group.isEmpty ? "/api/\(version)" : "/apis/\(group)/\(version)"
        if let namespace { return "\(root)/namespaces/\(namespace)/\(plural)" }
        return "\(root)/\(plural)"
    }
}

/// Paged lists: `limit` + `continue`; an expired continue token (410) restarts the list; a second expiry
/// falls back to one unpaged list, as client-go's pager does.
///
/// The server is not trusted to end the list: a continue token it already sent, more than `maxPages`
/// pages, more than `maxItems` items, or more than `listTimeout` for the whole list ends it with an error.
struct Lister {
    let session: APISession
    let pageSize: Int
    var maxItems = 1_000_000
    var maxPages = 10_000
    var listTimeout: Duration = .seconds(600)

    func listAll(_ options: KubernetesSourceOptions) async throws(KubernetesAPIError) -> ClusterObjects {
        let scopes = Self.scopes(options)
        var result = ClusterObjects()
        for ns in scopes {
            result.merge(try await list(.services, namespace: ns, labelSelector: options.labelSelector).objects)
        }
        var slices = ClusterObjects()
        for ns in scopes {
            slices.merge(try await list(.endpointSlices, namespace: ns, labelSelector: nil).objects)
        }
        if options.labelSelector != nil {
            // Only the slices of the Services the selector chose.
            let wanted = Set(result.services.map { $0.id })
            slices.endpointSlices.removeAll { slice in
                guard let name = slice.serviceName else { return true }
                return !wanted.contains(ObjectName(namespace: slice.id.namespace, name: name))
            }
        }
        result.merge(slices)
        return result
    }

    /// The scopes lists and watches run in: nil (all namespaces) or each `--namespace` once.
    static func scopes(_ options: KubernetesSourceOptions) -> [String?] {
        var seen = Set<String>()
        let unique = options.namespaces.filter { seen.insert($0).inserted }
        return unique.isEmpty ? [nil] : unique.map { Optional($0) }
    }

    /// One object left out of a lenient list: its name when `metadata.namespace`/`name` could be read, and the
    /// decoder's message (source, object, field).
    struct InvalidItem: Sendable, Equatable {
        var name: ObjectName?
        var message: String
    }

    /// A complete list of one resource in one scope.
    struct ListResult: Sendable {
        var objects: ClusterObjects
        /// The list's `metadata.resourceVersion`: where a watch continues from.
        var resourceVersion: String
        /// Only in lenient mode: the items that could not be decoded (and are not in `objects`).
        var invalid: [InvalidItem] = []
    }

    /// Lists all pages. Strict (the one-shot `load`): the first item that cannot be decoded fails the list.
    /// Lenient (the watch): such items are left out and reported in `invalid`, the rest is kept.
    func list(_ resource: Resource, namespace: String?, labelSelector: String?,
              lenient: Bool = false) async throws(KubernetesAPIError) -> ListResult {
        let base = resource.path(namespace: namespace)
        let what = "listing \(resource.plural) \(namespace.map { "in namespace \"\($0)\"" } ?? "in all namespaces") at \(session.displayURL(base))"
        let deadline = ContinuousClock.now + listTimeout
        var expiries = 0
        var pages = 0
        restart: while true {
            var result = ListResult(objects: ClusterObjects(), resourceVersion: "")
            var continueToken: String? = nil
            var seenTokens = Set<String>()
            let paged = expiries < 2
            while true {
                guard ContinuousClock.now < deadline else {
                    throw KubernetesAPIError(.unavailable, "\(what) did not finish within \(seconds(listTimeout)) (\(pages) pages so far)")
                }
                pages += 1
                guard pages <= maxPages else {
                    throw session.badData("\(what): the server sent more than \(maxPages) pages; stopped (the page limit)")
                }
                var query: [(String, String)] = []
                if let labelSelector { query.append(("labelSelector", labelSelector)) }
                if paged { query.append(("limit", String(pageSize))) }
                if let continueToken { query.append(("continue", continueToken)) }
                let pathAndQuery = base + queryString(query)
                let response = try await session.get(pathAndQuery)
                if response.status == 410, continueToken != nil {
                    expiries += 1
                    continue restart
                }
                guard (200..<300).contains(response.status) else {
                    throw session.failure(response, verb: "list", resource: resource, namespace: namespace,
                                          pathAndQuery: pathAndQuery)
                }
                let next = try decodePage(response.body, resource: resource, source: session.displayURL(base),
                                          lenient: lenient, into: &result)
                let items = result.objects.services.count + result.objects.endpointSlices.count + result.invalid.count
                guard items <= maxItems else {
                    throw session.badData("\(what): the server sent more than \(maxItems) items; stopped (the item limit)")
                }
                guard let next, paged else {
                    // The server's list is authoritative: no items means an empty cluster, not a failed read.
                    if items == 0 { result.objects.sawEmptyList = true }
                    result.objects.documents += 1
                    return result
                }
                guard seenTokens.insert(next).inserted else {
                    throw session.badData("\(what): the server sent a continue token it had already sent (page \(pages)); stopped instead of looping")
                }
                continueToken = next
            }
        }
    }

    /// Decodes one page with KubeObjects' decoders (the ones `DocumentLoader` uses) while it is parsed: each
    /// item is turned into a Service or EndpointSlice as soon as it is read and never kept as a tree.
    /// Returns `metadata.continue` when there is a next page; sets the result's resource version.
    func decodePage(_ body: [UInt8], resource: Resource, source: String, lenient: Bool = false,
                    into result: inout ListResult) throws(KubernetesAPIError) -> String? {
        var page = ClusterObjects()
        var invalid: [InvalidItem] = []
        var index = 0
        var itemError: InputError? = nil
        let parsed: JSONValue?
        do {
            parsed = try JSONParser.parse(body, topLevelItems: { item in
                defer { index += 1 }
                do throws(InputError) {
                    let locator = "\(resource.listKind) items[\(index)]"
                    if resource.listKind == "ServiceList" {
                        page.services.append(try ObjectDecoder.decodeService(item, source: source, locator: locator))
                    } else {
                        page.endpointSlices.append(try ObjectDecoder.decodeEndpointSlice(item, source: source, locator: locator))
                    }
                    return .consumed
                } catch {
                    if lenient {
                        invalid.append(InvalidItem(name: looseObjectName(item), message: session.redacted(error.description)))
                        return .consumed
                    }
                    itemError = error
                    return .stop
                }
            })
        } catch {
            throw session.badData("\(source): the API server's answer is not JSON (line \(error.line), column \(error.column): \(error.message))")
        }
        if let itemError { throw session.badData(itemError.description) }
        guard let document = parsed else { throw session.badData("\(source): unreadable answer") }
        guard case .string(let kind)? = document["kind"], kind == resource.listKind else {
            var got = "no kind"
            if case .string(let k)? = document["kind"] { got = "kind \(InputErrorText.printable(k))" }
            throw session.badData("\(source): expected a \(resource.listKind), got \(got)")
        }
        result.objects.merge(page)
        result.invalid += invalid
        if case .string(let rv)? = document["metadata"]?["resourceVersion"] { result.resourceVersion = rv }
        if case .string(let c)? = document["metadata"]?["continue"], !c.isEmpty { return c }
        return nil
    }
}

/// `metadata.namespace`/`metadata.name` of an object that may not decode, when both are strings (a missing
/// namespace reads as "default", as the decoder does); nil when the name cannot be read.
func looseObjectName(_ object: JSONValue) -> ObjectName? {
    guard case .string(let name)? = object["metadata"]?["name"], !name.isEmpty else { return nil }
    var namespace = "default"
    if case .string(let ns)? = object["metadata"]?["namespace"], !ns.isEmpty { namespace = ns }
    return ObjectName(namespace: namespace, name: name)
}

/// `?k=v&k=v` with each value %-encoded; "" for no parameters.
func queryString(_ query: [(String, String)]) -> String {
    query.isEmpty ? "" : "?" + query.map { "\($0.0)=\(percentEncode($0.1))" }.joined(separator: "&")
}
