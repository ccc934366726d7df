{{/* One node DaemonSet. Arguments: root (the chart's context), name (suffix), cfg (settings). */}}
{{- define "strata.nodeDaemonSet" -}}
{{- $ := .root }}
{{- $cfg := .cfg }}
{{- $kubelet := $cfg.kubeletDir }}
{{- $plugin := printf "%s/plugins/%s" $kubelet (include "strata.driver" $) }}
{{- $storage := $cfg.storageDir }}
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: {{ include "strata.fullname" $ }}-{{ .name }}
  labels: {{- include "strata.labels" $ | nindent 4 }}
    app.kubernetes.io/component: node
spec:
  selector:
    matchLabels: {{- include "strata.selector" $ | nindent 6 }}
      app.kubernetes.io/component: node
      strata.csi.dev/daemonset: {{ .name }}
  # One pod per node at a time: the old pod goes before the new one starts, so host ports and the
  # plugin socket are never claimed twice. Attached volumes keep working meanwhile (their data
  # path is the kernel's, and lazily restoring ones are served by hydrator pods of their own).
  updateStrategy:
    type: RollingUpdate
    rollingUpdate: {maxUnavailable: 1, maxSurge: 0}
  template:
    metadata:
      labels: {{- include "strata.selector" $ | nindent 8 }}
        app.kubernetes.io/component: node
        strata.csi.dev/daemonset: {{ .name }}
    spec:
      serviceAccountName: {{ include "strata.fullname" $ }}-node
      priorityClassName: {{ $.Values.node.priorityClassName }}
      hostNetwork: {{ $cfg.hostNetwork }}
      # The preflight check reads the host's mount table (/proc/1/mountinfo).
      hostPID: true
      {{- if $cfg.hostNetwork }}
      dnsPolicy: ClusterFirstWithHostNet
      {{- end }}
      {{- with $cfg.nodeSelector }}
      nodeSelector: {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $cfg.tolerations }}
      tolerations: {{- toYaml . | nindent 8 }}
      {{- end }}
      initContainers:
        # The storage directory is mounted with Bidirectional propagation (the loop devices'
        # filesystems and the hydrators' FUSE files must reach the kubelet), which the kubelet
        # refuses unless the host path lies on a shared mount. Hosts run by systemd have shared
        # mounts; others need `mount --bind DIR DIR && mount --make-rshared DIR` once per boot.
        # Without it, say so plainly instead of the kubelet's terse error.
        - name: check-storage-dir
          image: {{ include "strata.image" $ }}
          imagePullPolicy: {{ $.Values.image.pullPolicy }}
          command: [/bin/sh, -c]
          args:
            - |
              set -eu
              dir={{ $storage | quote }}
              propagation() {
                # The mount holding $dir in the host's table: the longest mount point that is a
                # prefix of it; its optional fields say "shared:N" when it propagates.
                awk -v d="$dir" '{ mp = $5; if (d == mp || index(d, (mp == "/" ? "/" : mp "/")) == 1) { if (length(mp) >= best) { best = length(mp); opt = ""; for (i = 7; $i != "-"; i++) opt = opt " " $i; at = mp } } }
                  END { print at "|" opt }' /proc/1/mountinfo
              }
              found=$(propagation)
              case "$found" in
                *shared:*) echo "storage directory $dir: on mount ${found%%|*}, shared"; exit 0 ;;
              esac
              echo "ERROR: the storage directory $dir is on the mount ${found%%|*}, which is not a shared mount." >&2
              echo "The node plugin mounts it with Bidirectional propagation, which needs a shared mount." >&2
              echo "On the node run: mount --bind $dir $dir && mount --make-rshared $dir" >&2
              echo "(hosts booted by systemd have shared mounts already), or put node.storageDir below" >&2
              echo "the kubelet directory, which the kubelet keeps shared." >&2
              exit 1
          securityContext:
            privileged: true
            runAsUser: 0
      containers:
        - name: strata
          image: {{ include "strata.image" $ }}
          imagePullPolicy: {{ $.Values.image.pullPolicy }}
          args: [node]
          # Loop devices, mounts, fsfreeze and mkfs need a privileged container running as root.
          securityContext:
            privileged: true
            runAsUser: 0
          env:
            - name: CSI_ENDPOINT
              value: unix:///csi/csi.sock
            - name: NODE_NAME
              valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
            {{- with $cfg.zone }}
            - name: STRATA_ZONE
              value: {{ . | quote }}
            {{- end }}
            - name: STRATA_STORAGE_DIR
              value: {{ $storage | quote }}
            - name: POD_IP
              valueFrom: {fieldRef: {fieldPath: status.podIP}}
            - name: POD_NAME
              valueFrom: {fieldRef: {fieldPath: metadata.name}}
            - name: POD_NAMESPACE
              valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
            - name: STRATA_AGENT_LISTEN
              value: "$(POD_IP):{{ include "strata.int" $cfg.agentPort }}"
            - name: STRATA_MAX_VOLUMES
              value: {{ include "strata.int" $.Values.node.maxVolumes | quote }}
            - name: STRATA_CHUNK_SIZE
              value: {{ include "strata.int" $.Values.node.chunkSize | quote }}
            - name: STRATA_TRANSFER_CONCURRENCY
              value: {{ include "strata.int" $.Values.node.transferConcurrency | quote }}
            - name: STRATA_MAX_FREEZE_SECS
              value: {{ include "strata.int" $.Values.node.maxFreezeSecs | quote }}
            {{- if $.Values.metrics.enabled }}
            - name: STRATA_METRICS_ADDR
              value: "0.0.0.0:{{ include "strata.int" $cfg.metricsPort }}"
            {{- end }}
            {{- if $.Values.node.hydrationBandwidthMib }}
            - name: STRATA_HYDRATION_BANDWIDTH_MIB
              value: {{ include "strata.int" $.Values.node.hydrationBandwidthMib | quote }}
            {{- end }}
            {{- if $.Values.node.hydratorPods }}
            - name: STRATA_HYDRATOR_POD_TEMPLATE
              value: /etc/strata/hydrator/pod.yaml
            {{- end }}
            {{- include "strata.agentTlsEnv" $ | nindent 12 }}
            {{- include "strata.commonEnv" $ | nindent 12 }}
          ports:
            - {name: agent, containerPort: {{ include "strata.int" $cfg.agentPort }}}
            {{- if $.Values.metrics.enabled }}
            - {name: metrics, containerPort: {{ include "strata.int" $cfg.metricsPort }}}
            {{- end }}
          # Ready only once the plugin answers CSI Probe on its socket (through the livenessprobe
          # sidecar), so `helm install --wait` returns when the driver serves.
          readinessProbe:
            httpGet: {path: /healthz, port: {{ include "strata.int" $cfg.healthPort }}}
            periodSeconds: 2
            failureThreshold: 3
          livenessProbe:
            httpGet: {path: /healthz, port: {{ include "strata.int" $cfg.healthPort }}}
            initialDelaySeconds: 10
            periodSeconds: 10
            failureThreshold: 5
          resources: {{- toYaml $cfg.resources | nindent 12 }}
          volumeMounts:
            - {name: plugin-dir, mountPath: /csi}
            # Mounts made here must be seen by the kubelet and by pods.
            - {name: kubelet-dir, mountPath: {{ $kubelet }}, mountPropagation: Bidirectional}
            - {name: storage-dir, mountPath: {{ $storage }}, mountPropagation: Bidirectional}
            - {name: dev, mountPath: /dev}
            - {name: agent-token, mountPath: /etc/strata/agent, readOnly: true}
            {{- include "strata.agentTlsMount" $ | nindent 12 }}
            {{- if $.Values.node.hydratorPods }}
            - {name: hydrator-template, mountPath: /etc/strata/hydrator, readOnly: true}
            {{- end }}
        - name: node-driver-registrar
          image: {{ $.Values.sidecars.registrar.image }}
          args:
            - --csi-address=/csi/csi.sock
            - --kubelet-registration-path={{ $plugin }}/csi.sock
          securityContext: {allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
          volumeMounts:
            - {name: plugin-dir, mountPath: /csi}
            - {name: registration-dir, mountPath: /registration}
        - name: liveness-probe
          image: {{ $.Values.sidecars.livenessprobe.image }}
          args: [--csi-address=/csi/csi.sock, "--health-port={{ include "strata.int" $cfg.healthPort }}"]
          securityContext: {allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
          volumeMounts:
            - {name: plugin-dir, mountPath: /csi}
      volumes:
        - name: plugin-dir
          hostPath: {path: {{ $plugin }}, type: DirectoryOrCreate}
        - name: registration-dir
          hostPath: {path: {{ $kubelet }}/plugins_registry, type: Directory}
        - name: kubelet-dir
          hostPath: {path: {{ $kubelet }}, type: Directory}
        - name: storage-dir
          hostPath: {path: {{ $storage }}, type: DirectoryOrCreate}
        - name: dev
          hostPath: {path: /dev, type: Directory}
        - name: agent-token
          secret:
            secretName: {{ include "strata.agentSecret" $ }}
            items: [{key: token, path: token}]
        {{- include "strata.agentTlsVolume" $ | nindent 8 }}
        {{- if $.Values.node.hydratorPods }}
        - name: hydrator-template
          configMap: {name: {{ include "strata.fullname" $ }}-hydrator}
        {{- end }}
{{- end -}}
